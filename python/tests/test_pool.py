"""mk1's Python package end to end: real pools of worker processes.

Functions the workers run are defined at module level here (the workers import this module by
name through the caller's sys.path, as multiprocessing's spawn does).
"""

from __future__ import annotations

import collections
import concurrent.futures
import gc
import multiprocessing
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings

import numpy as np
import pytest

import mk1

DTYPES = [
    np.int8,
    np.uint8,
    np.int16,
    np.uint16,
    np.int32,
    np.uint32,
    np.int64,
    np.uint64,
    np.float32,
    np.float64,
]
SHAPES = [(0,), (1, 1), (17, 33), (3, 4, 5, 6), (5, 0, 2)]


def x3p1(x):
    return x * 3 + 1


def restarts_reaching(pool, n, timeout=10.0):
    """``pool.restarts()`` once it reaches ``n``, or at ``timeout`` seconds. The pool replaces
    a worker once a caller has seen it go, and publishes the count a moment later, so this keeps
    one small task going while it polls."""
    deadline = time.monotonic() + timeout
    while pool.restarts() < n and time.monotonic() < deadline:
        pool.submit(x3p1, np.ones(1)).result()
        time.sleep(0.01)
    return pool.restarts()


def x3p1_out(x, out):
    np.multiply(x, 3, out=out)
    out += 1


def row_sums_f64(x):
    return x.sum(axis=-1, dtype=np.float64)


def total(x):
    return x.sum()


def grow(x):
    return np.zeros(x.size * 1000, dtype=np.float64)


def slow_x3p1(x):
    time.sleep(0.002)
    return x * 3 + 1


def sleeps(x):
    time.sleep(float(x[0]))
    return x


def which_worker(x):
    return np.array([mk1.worker_id(), mk1.worker_state().get("tag", -1)], dtype=np.int64)


def tag_worker(tag):
    mk1.worker_state()["tag"] = tag


def failing_init():
    raise RuntimeError("initializer says no")


def try_to_write_input(x):
    x[0] = 99
    return x


class CustomError(Exception):
    def __init__(self, code, why):
        super().__init__(code, why)
        self.code = code


def raises_custom(x):
    if x[0] < 0:
        raise CustomError(int(x[0]), "negative first element")
    return x


def raises_local(x):
    class Local(Exception):
        pass

    raise Local("a type the caller cannot import")


def returns_bool(x):
    return x > 0


def _children(parent: int | None = None) -> set[int]:
    """Live (not zombie) child processes of ``parent`` (this process by default)."""
    me = os.getpid() if parent is None else parent
    kids = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            kids.add(int(pid))
    return kids


def _gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _gone_soon(pid: int, timeout: float = 10.0) -> bool:
    """``_gone(pid)``, waiting up to ``timeout`` seconds for it (an orphaned worker exits once
    it notices its parent is gone, which takes a moment on a busy host)."""
    deadline = time.monotonic() + timeout
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return _gone(pid)


@pytest.fixture(autouse=True)
def no_leftovers():
    """Every test leaves no worker process and nothing in /dev/shm."""
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    kids_before = _children()
    yield
    deadline = time.monotonic() + 5
    while _children() - kids_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (_children() - kids_before), "worker processes left behind"
    if os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) - shm_before == set(), "files left in /dev/shm"


_DEFAULT_LEND_MIN = mk1._pool._LEND_MIN


@pytest.fixture(autouse=True)
def lend_every_result(monkeypatch):
    """A zero_copy map lends results of 64 KiB and more and copies smaller ones; the tests of
    lending use small arrays, so here every result of such a map is lent (except under
    ``default_lend_min``)."""
    monkeypatch.setattr(mk1._pool, "_LEND_MIN", 0)


@pytest.fixture
def default_lend_min(monkeypatch):
    """The package's own threshold for lending (undoes ``lend_every_result``)."""
    monkeypatch.setattr(mk1._pool, "_LEND_MIN", _DEFAULT_LEND_MIN)


def lent(y) -> bool:
    """Whether the array ``y`` is (a view of) shared memory lent by mk1."""
    while y is not None and not isinstance(y, (bytes, bytearray)):
        if type(y).__name__ == "View":
            return True
        y = getattr(y, "base", None)
    return False


@pytest.fixture
def tmp_path():
    """A scratch directory removed after the test (pytest's own keeps the last runs in /tmp)."""
    with tempfile.TemporaryDirectory(prefix="mk1-test-") as d:
        yield pathlib.Path(d)


@pytest.fixture(scope="module")
def pool():
    with mk1.Pool(workers=2, max_array_bytes=1 << 20) as p:
        yield p



def _taken_until(results, error, match=None) -> list:
    """The results an iterator gave before it raised ``error`` (which it must)."""
    got = []
    with pytest.raises(error, match=match):
        for r in results:
            got.append(r)
    return got

def sample(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(size=shape).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_dtype_and_shape_through_a_function_and_an_op(pool, dtype):
    arrays = [sample(dtype, s, i) for i, s in enumerate(SHAPES)]
    with np.errstate(over="ignore"):
        want = [a * 3 + 1 for a in arrays]
        for got, w in zip(pool.map(x3p1, arrays), want):
            assert got.dtype == w.dtype and got.shape == w.shape
            np.testing.assert_array_equal(got, w)
        for got, w in zip(pool.map(mk1.ops.affine(3, 1), arrays), want):
            assert got.dtype == w.dtype and got.shape == w.shape
            if np.issubdtype(dtype, np.floating):
                np.testing.assert_allclose(got, w, rtol=1e-6)
            else:
                np.testing.assert_array_equal(got, w)


def test_map_is_ordered_and_imap_unordered_is_complete(pool):
    rng = np.random.default_rng(1)
    arrays = [
        np.full((rng.integers(1, 64), rng.integers(1, 64)), i, dtype=np.float32)
        for i in range(500)
    ]
    out = list(pool.map(x3p1, arrays))
    assert len(out) == 500
    for i, (a, y) in enumerate(zip(arrays, out)):
        assert y.shape == a.shape and y.flat[0] == i * 3 + 1
    seen = sorted(int((y.flat[0] - 1) / 3) for y in pool.imap_unordered(x3p1, arrays))
    assert seen == list(range(500))


def test_outputs_of_another_dtype_and_shape_and_scalars(pool):
    a = np.arange(12, dtype=np.int16).reshape(3, 4)
    (y,) = pool.map(row_sums_f64, [a])
    assert y.dtype == np.float64 and y.shape == (3,)
    np.testing.assert_array_equal(y, [6, 22, 38])
    (s,) = pool.map(total, [a])
    assert s == 66 and type(s) is np.int64, "a scalar comes back as it is"
    with pytest.raises(mk1.ArrayTooLarge, match="max_array_bytes"):
        pool.submit(grow, np.ones(1000, np.float64)).result()
    # A result that is not an array mk1 carries comes back pickled, as it is.
    b = pool.submit(returns_bool, a).result()
    assert b.dtype == np.bool_ and np.array_equal(b, a > 0)
    assert pool.submit(x3p1, a).result()[0, 1] == 4, "the pool goes on"


def test_out_argument_writes_in_shared_memory(pool):
    a = np.linspace(0, 1, 1000, dtype=np.float32).reshape(10, 100)
    (y,) = pool.map(x3p1_out, [a])
    np.testing.assert_allclose(y, a * 3 + 1, rtol=1e-6)


def test_inputs_are_read_only_in_the_worker(pool):
    with pytest.raises(ValueError, match="read-only") as info:
        pool.submit(try_to_write_input, np.zeros(4)).result()
    if sys.version_info >= (3, 11):
        assert any("read-only views of shared memory" in n for n in info.value.__notes__)


def test_zero_copy_results_are_read_only_views(pool):
    arrays = [np.full((8, 8), i, dtype=np.int32) for i in range(100)]
    total_seen = 0
    for i, y in enumerate(pool.map(x3p1, arrays, zero_copy=True)):
        assert not y.flags.writeable
        assert y[0, 0] == i * 3 + 1
        total_seen += 1
        del y
    assert total_seen == 100


def test_exceptions_keep_their_type_and_the_workers_traceback(pool):
    with pytest.raises(CustomError) as info:
        pool.submit(raises_custom, np.array([-7, 1])).result()
    assert info.value.code == -7
    assert "negative first element" in str(info.value)
    tb = str(info.value.__cause__)
    assert "raise CustomError" in tb and "Traceback" in tb
    # (Named as multiprocessing.pool's, for code that looks for it by name.)
    assert type(info.value.__cause__).__name__ == "RemoteTraceback"
    with pytest.raises(mk1.RemoteError, match="a type the caller cannot import"):
        pool.submit(raises_local, np.ones(2)).result()
    # In a map: raised when iteration reaches the failed array; earlier results came.
    arrays = [np.array([1.0]), np.array([2.0]), np.array([-3.0]), np.array([4.0])]
    got = []
    with pytest.raises(CustomError):
        for y in pool.map(raises_custom, arrays):
            got.append(float(y[0]))
    assert got == [1.0, 2.0]
    assert list(pool.map(x3p1, [np.ones(2)]))[0][0] == 4


def test_bad_input_is_refused_before_anything_runs(pool):
    with pytest.raises(mk1.ArrayTooLarge, match="bytes"):
        pool.submit(x3p1, np.zeros(1 << 20, dtype=np.float64))
    with pytest.raises(mk1.ArrayTooLarge, match="arguments take"):
        pool.submit(x3p1, np.zeros(1 << 20, dtype=np.complex64))
    with pytest.raises(TypeError, match="callable"):
        pool.submit(42, np.zeros(3))
    with pytest.raises(TypeError, match="built-in op"):
        pool.submit(mk1.ops.affine(3, 1), np.zeros(3), 2)
    with pytest.raises(TypeError, match="built-in op"):
        pool.submit(mk1.ops.affine(3, 1), "abc")
    # A strided input is copied into the slot first.
    base = np.arange(40, dtype=np.int64).reshape(4, 10)
    np.testing.assert_array_equal(pool.submit(x3p1, base[:, ::3]).result(), base[:, ::3] * 3 + 1)
    np.testing.assert_array_equal(pool.submit(x3p1, base.T).result(), base.T * 3 + 1)


def test_list_of_a_map_over_10000_arrays_with_a_small_pool():
    with mk1.Pool(workers=2, slots=4) as pool:
        arrays = (np.full(16, i, dtype=np.int32) for i in range(10_000))
        out = list(pool.map(x3p1, arrays))
    assert len(out) == 10_000
    assert all(y[0] == i * 3 + 1 for i, y in enumerate(out))


def test_a_worker_killed_mid_map_is_replaced_and_every_result_is_right():
    with mk1.Pool(workers=2, slots=8) as pool:
        arrays = [np.full((32, 32), i, dtype=np.float32) for i in range(600)]
        out = []
        kills = 0
        for i, y in enumerate(pool.map(slow_x3p1, arrays)):
            out.append(y)
            if i in (50, 200, 400):
                os.kill(pool.worker_pids()[0], signal.SIGKILL)
                kills += 1
        assert len(out) == 600
        for i, y in enumerate(out):
            assert y.shape == (32, 32) and np.all(y == i * 3 + 1)
        assert restarts_reaching(pool, kills) >= 1


def test_in_place_mode_and_kept_copies():
    with mk1.Pool(workers=2, mode="in-place", keep_copies=True) as pool:
        arrays = [np.arange(100, dtype=np.uint16) + i for i in range(50)]
        with np.errstate(over="ignore"):
            for a, y in zip(arrays, pool.map(x3p1, arrays)):
                np.testing.assert_array_equal(y, a * 3 + 1)
        (y,) = pool.map(x3p1_out, [np.ones(5, np.int32)])
        np.testing.assert_array_equal(y, 4)


def test_initializer_worker_id_and_state():
    with mk1.Pool(workers=2, initializer=tag_worker, initargs=(7,)) as pool:
        ids = set()
        for y in pool.map(which_worker, [np.zeros(1)] * 200):
            ids.add(int(y[0]))
            assert y[1] == 7
        assert ids <= {0, 1} and ids
    with pytest.raises(mk1.PoolStartError, match="initializer failed: .*initializer says no"):
        mk1.Pool(workers=1, initializer=failing_init)
    # One that ends its process says what may have done it, in Python's terms.
    with pytest.raises(mk1.PoolStartError, match=r"the initializer.*os._exit") as e:
        mk1.Pool(workers=1, initializer=exits_five)
    assert "run_if_worker" not in str(e.value)


def exits_five():
    os._exit(5)


def test_a_start_error_names_the_worker_it_quotes():
    # Workers share one stderr: the error names the worker whose words it quotes (it named
    # worker 0 and quoted worker 1's in about half of such starts).
    for _ in range(6):
        with pytest.raises(mk1.PoolStartError) as e:
            mk1.Pool(workers=4, initializer=failing_init)
        named = re.search(r"cannot start worker (\d+)", str(e.value)).group(1)
        quoted = re.findall(r"mk1 worker (\d+):", str(e.value))
        assert quoted and quoted[0] == named, str(e.value)


def keep_initargs(big, tag):
    global _INIT_BIG
    _INIT_BIG = (int(big.sum()), big.nbytes, tag)


def initargs_seen(_):
    return _INIT_BIG


def test_initargs_larger_than_an_environment_variable_holds():
    # Initargs travel to the workers in a file (a memfd), not an environment variable (at
    # most 128 KiB on Linux: "Argument list too long" from 98 KB of initargs before); a
    # replacement worker gets them too.
    big = np.arange(3_000_000, dtype=np.int64) % 7
    with mk1.Pool(workers=2, initializer=keep_initargs, initargs=(big, "t" * 300_000)) as pool:
        want = (int(big.sum()), big.nbytes, "t" * 300_000)
        assert list(pool.map(initargs_seen, range(4))) == [want] * 4
        with pytest.raises(mk1.WorkerDied):
            pool.submit(os._exit, 3).result()
        assert list(pool.map(initargs_seen, range(4))) == [want] * 4


def test_a_long_argv_reaches_the_workers(tmp_path):
    # The caller's argv (a script given thousands of file names, say) goes to the workers
    # whole, however long, with the rest of their start-up data.
    r = run_script(
        tmp_path,
        """
        import sys, mk1

        def argv_len(_):
            return len(sys.argv), sum(map(len, sys.argv[1:]))

        if __name__ == "__main__":
            with mk1.Pool(workers=1) as pool:
                print(pool.submit(argv_len, 0).result() == argv_len(0))
        """,
        args=[f"/some/where/file-{i:06d}.npy" for i in range(8000)],
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True", r.stdout + r.stderr


def test_what_a_worker_starts_is_no_worker(tmp_path):
    # No MK1_ variable of the pool's reaches what a call starts: a script with a pool of its
    # own runs there as anywhere, and the mk1 program runs as itself.
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(
        """
        import numpy as np, mk1

        def double(x):
            return x * 2

        if __name__ == "__main__":
            with mk1.Pool(workers=1) as pool:
                print(list(pool.map(double, [np.arange(3)]))[0].tolist())
        """
    ))
    r = run_script(
        tmp_path,
        f"""
        import os, subprocess, sys, mk1

        def start(_):
            env = sorted(k for k in ("MK1_WORKER", "MK1_PY_BOOT") if k in os.environ)
            r = subprocess.run([sys.executable, {str(child)!r}], capture_output=True, text=True)
            return env, r.returncode, r.stdout.strip(), r.stderr[-300:]

        if __name__ == "__main__":
            with mk1.Pool(workers=1) as pool:
                print(pool.submit(start, 0).result())
                try:
                    pool.submit(mk1.Pool, 1).result()
                except RuntimeError as e:
                    print("refused:", e)
        """,
    )
    assert r.returncode == 0, r.stderr
    assert "([], 0, '[0, 2, 4]', '')" in r.stdout, r.stdout + r.stderr
    assert "refused: mk1.Pool cannot be created inside an mk1 worker" in r.stdout, r.stdout
    # MK1_WORKER set by hand in a process no pool started: said so, not "inside a worker".
    r = run_script(
        tmp_path,
        """
        import mk1

        if __name__ == "__main__":
            try:
                mk1.Pool(workers=1)
            except RuntimeError as e:
                print("refused:", e)
        """,
        env={"MK1_WORKER": "1"},
    )
    assert "refused: MK1_WORKER is set (to '1') in this process, which no mk1 pool started" in (
        r.stdout
    ), r.stdout + r.stderr


def test_the_start_up_file_falls_back_to_an_unlinked_temporary_file(tmp_path):
    # Where memfd_create is refused (a seccomp sandbox, say), the workers' start-up data goes
    # in an unlinked temporary file in TMPDIR (nothing left there); where that cannot be made
    # either, PoolStartError says what to do.
    r = run_script(
        tmp_path,
        f"""
        import errno, os, tempfile
        import numpy as np, mk1

        def deny(*a):
            raise OSError(errno.EPERM, "denied by the test")

        def init(big):
            global BIG
            BIG = big

        def size(_):
            return BIG.nbytes

        if __name__ == "__main__":
            os.memfd_create = deny
            tempfile.tempdir = {str(tmp_path / "tmp")!r}
            os.mkdir(tempfile.tempdir)
            with mk1.Pool(workers=1, initializer=init, initargs=(np.ones(300_000),)) as pool:
                print("sizes", pool.submit(size, 0).result(), os.listdir(tempfile.tempdir))
            tempfile.tempdir = {str(tmp_path / "missing")!r}
            try:
                mk1.Pool(workers=1)
            except mk1.PoolStartError as e:
                print("refused:", e)
        """,
    )
    assert r.returncode == 0, r.stderr
    assert "sizes 2400000 []" in r.stdout, r.stdout + r.stderr
    assert "no memfd ([Errno 1] denied by the test), and no temporary file" in r.stdout, (
        r.stdout + r.stderr
    )


def test_a_task_past_the_timeout_fails_and_the_pool_goes_on():
    # (The call after the timeout runs in a new worker, its start and first import included.)
    with mk1.Pool(workers=1, timeout=2.0) as pool:
        with pytest.raises(mk1.TaskTimeout):
            pool.submit(sleeps, np.array([30.0])).result()
        assert pool.submit(sleeps, np.array([0.0])).result()[0] == 0.0


def step(what: tuple) -> tuple:
    """``("wait", d, n)``: waits (20 s at most) for ``d`` to hold ``n`` files, and says whether it
    did; ``("mark", d, i)``: makes file ``i`` there after 8 ms (longer than the pool's
    ``queue_ahead``: such calls go to a worker only when it is free). Either way with the
    worker's pid."""
    kind, d, n = what
    if kind == "mark":
        time.sleep(0.008)
        pathlib.Path(d, str(n)).touch()
        return True, os.getpid()
    deadline = time.monotonic() + 20
    while len(os.listdir(d)) < n:
        if time.monotonic() > deadline:
            return False, os.getpid()
        time.sleep(0.002)
    return True, os.getpid()


def test_a_slow_call_does_not_hold_back_the_calls_after_it(tmp_path):
    """While one call runs long, the other worker runs every call after it: in a map in order
    (the results after the slow one wait for it as copies, not in the slots, which would stop
    the map once they filled them), and among futures (none waits at the slow call's worker).
    The slow call waits for all the others to have run, so it fails when any is held back.
    Twice: on a fresh pool, and with the workers' pace known."""
    with mk1.Pool(workers=2) as pool:
        for rnd in range(2):
            d = tmp_path / f"map{rnd}"
            d.mkdir()
            calls = [("wait", str(d), 100)] + [("mark", str(d), i) for i in range(100)]
            results = list(pool.map(step, calls))
            assert results[0][0], "the calls after the slow one ran meanwhile"
            assert all(ok for ok, _ in results)
            d = tmp_path / f"futures{rnd}"
            d.mkdir()
            slow = pool.submit(step, ("wait", str(d), 10))
            quick = [pool.submit(step, ("mark", str(d), i)) for i in range(10)]
            ok, slow_pid = slow.result()
            assert ok, "the futures after the slow one ran meanwhile"
            assert slow_pid not in {pid for _, pid in (f.result() for f in quick)}


def length_after_a_nap_on_zero(x: bytes) -> int:
    if x[0] == 0:
        time.sleep(1.5)
    return len(x)


def test_a_map_in_order_takes_bounded_input_ahead_of_a_slow_call():
    """Behind a slow call, a map in order goes on taking input, but at most about 64 MiB of it
    (arguments kept to run a call again, and results waiting as copies): here 1 MiB items,
    which the other worker would otherwise take all 400 of during the slow call."""
    taken = []

    def items():
        for i in range(400):
            taken.append(i)
            b = bytearray(1 << 20)
            b[0] = 0 if i == 0 else 1
            yield bytes(b)

    with mk1.Pool(workers=2) as pool:
        it = pool.map(length_after_a_nap_on_zero, items())
        assert next(it) == 1 << 20
        assert 16 < len(taken) <= 90, f"{len(taken)} items taken during the slow call"
        assert sum(it) == 399 << 20


def mark_or_wait(d: str, a: np.ndarray) -> np.ndarray:
    """``step`` for arrays: ``[-n]`` waits for ``d`` to hold ``n`` files (its result says
    whether it did), ``[i]`` makes file ``i`` there after 8 ms; the result has the input's
    shape and dtype."""
    i = int(a[0])
    if i >= 0:
        time.sleep(0.008)
        pathlib.Path(d, str(i)).touch()
        return a * 2
    deadline = time.monotonic() + 20
    while len(os.listdir(d)) < -i:
        if time.monotonic() > deadline:
            return np.zeros_like(a)
        time.sleep(0.002)
    return np.ones_like(a)


def test_a_slow_array_does_not_hold_back_the_arrays_after_it(tmp_path):
    """A map of arrays in order goes on behind a slow array as a map of calls does: the
    results after it wait as copies (they always were copies, but the map stopped once
    ``slots`` of them waited). The slow array waits for the 100 after it to have run."""
    import functools

    with mk1.Pool(workers=2) as pool:
        for rnd in range(2):  # fresh, then with the workers' pace known
            d = tmp_path / f"arrays{rnd}"
            d.mkdir()
            arrays = [np.array([-100.0])] + [np.array([float(i)]) for i in range(100)]
            out = list(pool.map(functools.partial(mark_or_wait, str(d)), arrays))
            assert out[0][0] == 1.0, "the arrays after the slow one ran meanwhile"
            assert [float(a[0]) for a in out[1:]] == [2.0 * i for i in range(100)]


def test_a_map_of_arrays_in_order_takes_bounded_input_ahead_of_a_slow_one():
    """Behind a slow array, a map of arrays in order takes input ahead, but at most about
    64 MiB of inputs and results: 1 MiB arrays here (the other worker would take all 400)."""
    taken = []

    def arrays():
        for i in range(400):
            taken.append(i)
            a = np.ones(1 << 18, dtype=np.float32)
            a[0] = 0 if i == 0 else 1
            yield a

    with mk1.Pool(workers=2, slots=8) as pool:
        it = pool.map(first_sleeps_on_zero, arrays())
        assert next(it)[0] == 0
        assert 16 < len(taken) <= 60, f"{len(taken)} arrays taken during the slow one"
        assert sum(float(a[1]) for a in it) == 399


def first_sleeps_on_zero(a: np.ndarray) -> np.ndarray:
    if a[0] == 0:
        time.sleep(1.5)
    return a.copy()


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_a_future_no_worker_has_yet_can_be_cancelled():
    """``cancel()`` takes back a call that waits in the pool for a worker (a call of unknown or
    long length goes to a worker only when it is free), as ``ProcessPoolExecutor``'s takes back
    a call not started: it completes as cancelled for ``result``, ``wait``, ``as_completed``
    and callbacks, and never runs. A call a worker has is not cancelled and completes.
    ``shutdown(cancel_futures=True)`` cancels those waiting and waits for the others."""
    with mk1.Pool(workers=2) as pool:
        for rnd in range(2):  # fresh, then with the calls' length known
            futs = [pool.submit(nap, 1.0) for _ in range(6)]
            seen = []
            futs[5].add_done_callback(lambda f: seen.append(f.cancelled()))
            assert [f.running() for f in futs] == [True, True, False, False, False, False]
            assert [f.cancel() for f in futs] == [False, False, True, True, True, True]
            assert futs[3].cancel(), "cancelled already"
            assert seen == [True]
            done = list(concurrent.futures.as_completed(futs, timeout=30))
            assert len(done) == 6 and set(done[:4]) == set(futs[2:])
            assert [f.result() for f in futs[:2]] == [1.0, 1.0]
            with pytest.raises(concurrent.futures.CancelledError):
                futs[2].result()
        futs = [pool.submit(nap, 1.0) for _ in range(6)]
        pool.shutdown(cancel_futures=True)
        assert [f.cancelled() for f in futs] == [False, False, True, True, True, True]
        assert [f.result() for f in futs[:2]] == [1.0, 1.0]
    # Without a limit every call goes to a worker when submitted: none waits to be cancelled.
    with mk1.Pool(workers=2, queue_ahead=None) as pool:
        futs = [pool.submit(nap, 0.2) for _ in range(4)]
        assert not any(f.cancel() for f in futs)
        assert [f.result() for f in futs] == [0.2] * 4
    with pytest.raises(ValueError, match="queue_ahead"):
        mk1.Pool(workers=1, queue_ahead=-1.0)


def test_a_map_hands_out_its_results_while_something_else_holds_a_slot():
    """A map's results go out while a future, or a call an earlier map left running, holds one
    of the slots: its window counted on that slot, and its own results waiting in theirs used
    to go out only once the other call was done."""
    with mk1.Pool(workers=2) as pool:
        for fn in (pool.map, pool.imap_unordered):
            slow = pool.submit(nap, 3.0)
            assert sorted(fn(nap, [0.02] * 10)) == [0.02] * 10
            assert not slow.done(), "the map's results waited for the future"
            slow.result()
        with pytest.raises(concurrent.futures.TimeoutError):
            list(pool.map(nap, [3.0, 0.02], timeout=0.3))
        t0 = time.monotonic()
        assert list(pool.map(nap, [0.02] * 10)) == [0.02] * 10
        assert time.monotonic() - t0 < 2.0, "the map waited for the call left running"
    # With a future pending, the pool's own thread waits for results holding the pool, 50 ms
    # at a time: the results a map had in hand (60, behind its slow first call) came out one
    # per such wait (3 s).
    with mk1.Pool(workers=3) as pool:
        slow = pool.submit(nap, 4.0)
        t0 = time.monotonic()
        assert len(list(pool.map(nap, [0.5] + [0.001] * 60, chunksize=1))) == 61
        took = time.monotonic() - t0
        assert not slow.done()
        assert took < 2.2, f"{took:.2f} s: the map's results came out one per wait of the pool's thread"
        slow.result()


def test_a_map_with_a_timeout_raises_when_a_result_is_late():
    """``map(..., timeout=)`` as ``concurrent.futures``': the iteration raises
    ``concurrent.futures.TimeoutError`` once a result has not come within ``timeout`` of its
    start (what came before goes out first), and the pool goes on. (A map starts its work
    when first iterated: the time before does not count.)"""
    with mk1.Pool(workers=2) as pool:
        # (Both workers have run a call, so the timed calls do not include their start.)
        assert [f.result() for f in [pool.submit(nap, 0.2) for _ in range(2)]] == [0.2] * 2
        got = []
        t0 = time.monotonic()
        with pytest.raises(concurrent.futures.TimeoutError):
            for r in pool.map(nap, [0.05, 0.05, 5.0] + [0.05] * 5, timeout=1.5):
                got.append(r)
        assert got == [0.05, 0.05]
        assert time.monotonic() - t0 < 4.0, "it did not wait for the slow call"
        with pytest.raises(concurrent.futures.TimeoutError):
            list(pool.imap_unordered(nap, [1.0], timeout=0))
        assert sorted(pool.imap_unordered(nap, [0.01] * 4, timeout=30)) == [0.01] * 4
        lazy = pool.map(nap, [0.01] * 4, timeout=1.5)
        time.sleep(2.0)
        assert list(lazy) == [0.01] * 4
        assert list(pool.map(np.sort, [np.arange(3)[::-1]] * 2, timeout=30))[1].tolist() == [
            0,
            1,
            2,
        ]


def test_futures(pool):
    futs = [pool.submit(x3p1, np.full(3, i)) for i in range(40)]
    assert [int(f.result()[0]) for f in futs] == [i * 3 + 1 for i in range(40)]
    assert all(f.done() for f in futs)
    assert pool.submit(mk1.ops.neg(), np.array([1, -2], np.int8)).result().tolist() == [-1, 2]


def test_progress_bar(pool, capsys):
    out = list(pool.map(x3p1, [np.ones(4)] * 20, progress=True))
    assert len(out) == 20
    out = list(pool.starmap(weighted_sum, [(1, 2)] * 30, progress=True))
    assert out == [3] * 30


def test_a_closed_pool_refuses_work():
    pool = mk1.Pool(workers=1)
    pool.close()
    pool.close()
    with pytest.raises(ValueError, match="closed"):
        pool.submit(x3p1, np.ones(2))
    # As multiprocessing.Pool: a closed pool is no context manager any more.
    with pytest.raises(ValueError, match="closed"):
        with pool:
            pass


def run_script(tmp_path, body, *, env=None, timeout=60, args=("7",), stdin=False):
    """Runs ``body`` as a script in ``tmp_path`` (or, with ``stdin``, as ``python -`` reading
    it from standard input)."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    if env:
        e.update(env)
    body = textwrap.dedent(body)
    if stdin:
        cmd, given = [sys.executable, "-"], body
    else:
        script = tmp_path / "script.py"
        script.write_text(body)
        cmd, given = [sys.executable, str(script), *args], None
    return subprocess.run(
        cmd,
        input=given,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=e,
        cwd=tmp_path,
    )


def test_lines_that_workers_print_together_stay_whole(tmp_path):
    """Each line a worker prints goes out in one write: lines of workers printing at once
    do not mix mid-line, and none is lost."""
    r = run_script(
        tmp_path,
        """
        import sys, numpy as np, mk1

        def f(x):
            for i in range(2000):
                print("line", int(x[0]), i, "of a worker's output", file=sys.stderr)
                print("out", int(x[0]), i)
            return x

        if __name__ == "__main__":
            with mk1.Pool(workers=2) as pool:
                list(pool.map(f, [np.full(2, k) for k in range(4)]))
        """,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    want = sorted(f"line {k} {i} of a worker's output" for k in range(4) for i in range(2000))
    assert sorted(r.stderr.splitlines()) == want
    want = sorted(f"out {k} {i}" for k in range(4) for i in range(2000))
    assert sorted(r.stdout.splitlines()) == want


def test_a_function_defined_in_the_main_script(tmp_path):
    r = run_script(
        tmp_path,
        """
        import numpy as np, mk1

        def double(x):
            return x * 2

        if __name__ == "__main__":
            with mk1.Pool(workers=2) as pool:
                out = list(pool.map(double, [np.arange(5)] * 10))
            print("ok", all((o == np.arange(5) * 2).all() for o in out))
        """,
    )
    assert r.returncode == 0, r.stderr
    assert "ok True" in r.stdout


def test_functions_the_workers_define_too_go_by_reference(tmp_path):
    # Defined inside a top-level `if`, `try` or loop, or a callable instance of a top-level
    # class: the workers' run of the script defines them too, so
    # they go by reference and see what the initializer set (as with multiprocessing).
    # Before, they were refused, or sent by value (with cloudpickle) and saw MODEL as None.
    r = run_script(
        tmp_path,
        """
        import os, numpy as np, mk1

        MODEL = None

        def init():
            global MODEL
            MODEL = {"scale": 10}

        if os.environ.get("FAST", "1") == "1":
            def predict(x):
                return x * MODEL["scale"]

        try:
            from no_such_module import fallback
        except ImportError:
            def fallback(x):
                return x + MODEL["scale"]

        class Lookup:
            def __call__(self, x):
                return x - MODEL["scale"]

        for _ in range(1):
            def looped(x):
                return x * MODEL["scale"] + 1

        class Apply:
            def __init__(self, f):
                self.f = f

            def __call__(self, x):
                return self.f(x)

        if __name__ == "__main__":
            xs = [np.arange(3.0)]
            with mk1.Pool(workers=2, initializer=init) as pool:
                print("predict", list(pool.map(predict, xs))[0].tolist())
                print("fallback", pool.submit(fallback, 1).result())
                print("lookup", list(pool.map(Lookup(), xs))[0].tolist())
                print("looped", pool.submit(looped, 2).result())

                # A top-level class's instance holding a function of the main guard: by value
                # (the workers do not have `double`), or refused without cloudpickle.
                def double(x):
                    return x * 2

                try:
                    print("apply", pool.submit(Apply(double), 4).result())
                except TypeError as e:
                    print("apply refused", "double" in str(e))
        """,
    )
    assert r.returncode == 0, r.stderr
    assert "predict [0.0, 10.0, 20.0]" in r.stdout
    assert "fallback 11" in r.stdout
    assert "lookup [-10.0, -9.0, -8.0]" in r.stdout
    assert "looped 21" in r.stdout
    assert "apply 8" in r.stdout or "apply refused True" in r.stdout, r.stdout


def test_which_definitions_of_a_script_its_workers_run():
    import ast

    source = textwrap.dedent(
        """
        def a(): pass
        if X:
            def b(): pass
        else:
            class C: pass
        try:
            def d(): pass
        except ImportError:
            def e(): pass
        finally:
            def f(): pass
        with open("x") as g:
            def h(): pass
        while False:
            def i(): pass
        if __name__ == "__main__":
            def not_run(): pass
        else:
            def j(): pass
        if "__main__" == __name__:
            def not_run_either(): pass
        def k():
            def nested(): pass
        match X:
            case 1:
                def m(): pass
        if __name__ == "__main__" and X:
            def not_surely_run(): pass
        IS_MAIN = __name__ == "__main__"
        if IS_MAIN:
            pass
        else:
            def not_surely_run_either(): pass
        if HAVE_GPU:
            def twice(): pass
        if __name__ == "__main__":
            def twice(): pass
        """
    )
    names = set(mk1._pool._names_run_on_import(ast.parse(source).body))
    assert names == set("abCdefhijkm")


def test_a_pool_at_the_top_level_of_a_script_says_to_add_the_main_guard(tmp_path):
    r = run_script(
        tmp_path,
        """
        import numpy as np, mk1

        def double(x):
            return x * 2

        with mk1.Pool(workers=2) as pool:   # no `if __name__ == "__main__":`
            print(list(pool.map(double, [np.arange(5)])))
        """,
    )
    assert r.returncode == 1, r.stderr
    assert "PoolStartError" in r.stderr
    assert 'put the code that makes the pool under `if __name__ == "__main__":`' in r.stderr


LAMBDA_SCRIPT = """
    import sys
    if "--no-cloudpickle" in sys.argv or {hide}:
        sys.modules["cloudpickle"] = None  # as if it were not installed
    import numpy as np, mk1

    if __name__ == "__main__":
        k = 5
        with mk1.Pool(workers=1) as pool:
            try:
                out = list(pool.map(lambda x: x + k, [np.ones(3)]))
                print("result", out[0].tolist())
            except TypeError as e:
                print("TypeError", e)
"""


def test_a_lambda_with_and_without_cloudpickle(tmp_path):
    pytest.importorskip("cloudpickle")
    r = run_script(tmp_path, LAMBDA_SCRIPT.format(hide=False))
    assert r.returncode == 0, r.stderr
    assert "result [6.0, 6.0, 6.0]" in r.stdout
    r = run_script(tmp_path, LAMBDA_SCRIPT.format(hide=True))
    assert r.returncode == 0, r.stderr
    assert "TypeError" in r.stdout and "cloudpickle" in r.stdout
    assert "as a lambda" in r.stdout, r.stdout


def test_a_lambda_at_the_top_level_without_cloudpickle_is_named_as_a_lambda(tmp_path):
    # (Not "defined under the main guard": it is not, and moving it would not help.)
    body = """
        import sys
        sys.modules["cloudpickle"] = None  # as if it were not installed
        import numpy as np, mk1

        top = lambda x: x * 2

        if __name__ == "__main__":
            with mk1.Pool(workers=1) as pool:
                try:
                    pool.submit(top, np.ones(3)).result()
                    print("no error")
                except TypeError as e:
                    print("TypeError", e)
        """
    r = run_script(tmp_path, body)
    assert r.returncode == 0, r.stderr
    assert "TypeError" in r.stdout and "as a lambda" in r.stdout, r.stdout
    assert "__main__" not in r.stdout.split("as a lambda")[1], r.stdout


def start_script(tmp_path, body, marker):
    """Starts ``body`` as a script in ``tmp_path`` (stdout and stderr piped) and waits until it
    has written something to ``marker``."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 30
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    return proc


def test_ctrl_c_stops_cleanly_with_nothing_left(tmp_path):
    pids_file = tmp_path / "pids"
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    proc = start_script(
        tmp_path,
        f"""
        import time, numpy as np, mk1
        from test_pool import slow_x3p1

        if __name__ == "__main__":
            with mk1.Pool(workers=2) as pool:
                with open({str(pids_file)!r}, "w") as f:
                    f.write(" ".join(map(str, pool.worker_pids())))
                for y in pool.map(slow_x3p1, (np.ones((64, 64)) for _ in range(10**9))):
                    pass
        """,
        pids_file,
    )
    time.sleep(0.5)  # mid-map
    workers = [int(p) for p in pids_file.read_text().split()]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert "KeyboardInterrupt" in err
    for pid in workers:
        assert _gone_soon(pid), pid
    if os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) - shm_before == set()


def slow_sleep(x):
    time.sleep(float(x[0]))
    return x


def job_control_of_children(x):
    """What becomes of job-control signals in what a worker's function starts: the SigIgn bits
    of SIGHUP, SIGINT and SIGTERM in a program it runs, how a child it forks and a `sleep` it
    runs end on SIGTERM."""
    status = subprocess.run(
        ["grep", "SigIgn", "/proc/self/status"], capture_output=True, text=True, check=True
    ).stdout
    ignored = int(status.split()[1], 16) & ((1 << 0) | (1 << 1) | (1 << 14))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, b"up")  # (after the fork hooks ran)
        time.sleep(10)
        os._exit(0)
    os.close(w)
    os.read(r, 2)
    os.close(r)
    os.kill(pid, signal.SIGTERM)
    forked = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    p = subprocess.Popen(["sleep", "10"])
    p.terminate()
    # What Python says of them in the worker: a handler, not SIG_IGN (which a function that
    # saves and restores a handler would put back).
    handled = all(
        callable(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    )
    return np.array([ignored, forked, p.wait(timeout=30), handled])


def test_what_a_worker_function_starts_stops_on_job_control_signals():
    """The worker lets Ctrl-C, SIGTERM and SIGHUP do nothing (the pool acts on them), but a
    program its function runs, or a child it forks, stops on them as usual: inherited
    ignored signals would leave them running after Ctrl-C, and hang a `terminate()` or a
    multiprocessing pool's exit."""
    with mk1.Pool(workers=1) as p:
        assert p.submit(job_control_of_children, np.zeros(1)).result().tolist() == [
            0, -signal.SIGTERM, -signal.SIGTERM, 1
        ]
        # The worker itself goes on through SIGTERM, SIGINT and SIGHUP.
        (pid,) = p.worker_pids()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(pid, sig)
        time.sleep(0.2)
        assert p.submit(x3p1, np.ones(2)).result().tolist() == [4.0, 4.0]
        assert p.worker_pids() == [pid] and p.restarts() == 0


def test_zero_copy_lends_large_results_and_copies_small_ones(default_lend_min):
    """Below 64 KiB a copy costs less than a view of shared memory: such results come as
    read-only copies, which hold no slot, so they may all be kept; larger ones are lent."""
    with mk1.Pool(workers=1, slots=4) as p:
        small = [np.full((127, 128), i, dtype=np.float32) for i in range(12)]  # 65024 bytes
        kept = list(p.map(mk1.ops.affine(3, 1), small, zero_copy=True))
        kept += list(p.map(x3p1, small, zero_copy=True))
        assert len(kept) == 24 and not any(lent(y) for y in kept)
        assert all(not y.flags.writeable for y in kept)
        assert [float(y[5, 7]) for y in kept] == [i * 3.0 + 1 for i in range(12)] * 2
        large = [np.full((128, 128), i, dtype=np.float32) for i in range(12)]  # 65536 bytes
        for fn in (mk1.ops.affine(3, 1), x3p1):
            for i, y in enumerate(p.map(fn, large, zero_copy=True)):
                assert lent(y) and not y.flags.writeable and float(y[127, 127]) == i * 3 + 1
                del y
            with pytest.raises(mk1.Mk1Error, match="still referenced"):
                list(p.map(fn, large, zero_copy=True))
        # Copied results, all the same (no zero_copy): never lent.
        assert not any(lent(y) for y in p.map(x3p1, large[:2]))


def test_zero_copy_results_may_be_kept_while_the_map_goes_on():
    with mk1.Pool(workers=2, slots=8) as pool:
        kept = []
        arrays = [np.full(64, i, dtype=np.int32) for i in range(40)]
        for i, y in enumerate(pool.map(x3p1, arrays, zero_copy=True)):
            if i < 3:
                kept.append(y)
            assert y[0] == i * 3 + 1
        assert [int(k[0]) for k in kept] == [1, 4, 7]
        # Keeping every result cannot work: a clear error, not a hang.
        with pytest.raises(mk1.Mk1Error, match="still referenced"):
            kept = list(pool.map(x3p1, arrays, zero_copy=True))
        del kept


def test_terminate_and_leaving_on_an_error_do_not_wait_for_running_tasks():
    t = time.monotonic()
    with pytest.raises(KeyError):
        with mk1.Pool(workers=2) as pool:
            futs = [pool.submit(slow_sleep, np.array([30.0])) for _ in range(4)]
            time.sleep(0.3)
            raise KeyError("the caller's own error")
    assert time.monotonic() - t < 10
    assert all(isinstance(f.exception(), mk1.Mk1Error) for f in futs)
    # close() waits, and the futures get their results.
    pool = mk1.Pool(workers=2)
    futs = [pool.submit(slow_sleep, np.array([0.2])) for _ in range(3)]
    pool.close()
    assert [f.result()[0] for f in futs] == [0.2] * 3


def test_numpy_functions_with_an_optional_out_are_called_plainly(pool):
    y = pool.submit(np.cumsum, np.ones(300, np.int8)).result()
    assert y[-1] == 300 and y.dtype == np.cumsum(np.ones(3, np.int8)).dtype
    assert pool.submit(np.mean, np.arange(10.0)).result() == 4.5


def test_an_array_of_exactly_max_array_bytes_fits():
    with mk1.Pool(workers=1, max_array_bytes=1 << 20) as pool:
        a = np.ones(1 << 18, np.float32)  # exactly 1 MiB
        assert pool.submit(x3p1, a).result()[0] == 4
        assert pool.submit(mk1.ops.neg(), a).result()[0] == -1
        with pytest.raises(mk1.ArrayTooLarge, match="max_array_bytes"):
            pool.submit(x3p1, np.ones((1 << 18) + 1, np.float32)).result()


def test_the_timeout_counts_from_when_a_task_starts_not_from_an_idle_spell():
    with mk1.Pool(workers=1, timeout=2.0) as pool:
        time.sleep(3.0)
        assert pool.submit(slow_sleep, np.array([0.3])).result()[0] == 0.3
        assert pool.restarts() == 0


def test_as_completed_and_a_map_continued_in_another_thread(pool):
    futs = [pool.submit(slow_sleep, np.array([0.01 * (i % 3)])) for i in range(9)]
    done = list(pool.as_completed(futs, timeout=30))
    assert sorted(id(f) for f in done) == sorted(id(f) for f in futs)
    got = []

    def other_thread():
        got.append(pool.submit(x3p1, np.full(2, 5.0)).result(timeout=30)[0])

    it = pool.map(x3p1, [np.full(2, float(i)) for i in range(40)])
    assert next(it)[0] == 1

    def consume_elsewhere():
        got.extend(y[0] for y in it)

    for target in (other_thread, consume_elsewhere):
        th = threading.Thread(target=target)
        th.start()
        th.join(timeout=60)
        assert not th.is_alive()
    assert got == [16] + [i * 3 + 1 for i in range(1, 40)]
    assert pool.submit(x3p1, np.ones(1)).result()[0] == 4


def test_threads_share_one_pool():
    """Maps (both orders), futures and zero-copy maps of eight threads at once on one pool,
    a future made in one thread and waited on in another: every result is its own input's."""
    errors = []
    handed = []
    with mk1.Pool(workers=2, slots=6) as pool:

        def work(t):
            try:
                arrays = [np.full(3, float(t * 1000 + i)) for i in range(150)]
                ys = list(pool.map(x3p1, arrays))
                assert [y[0] for y in ys] == [a[0] * 3 + 1 for a in arrays]
                got = sorted(y[0] for y in pool.imap_unordered(x3p1, arrays))
                assert got == sorted(a[0] * 3 + 1 for a in arrays)
                futs = [pool.submit(x3p1, a) for a in arrays[:20]]
                handed.append(futs[-1])
                assert [f.result(timeout=60)[0] for f in futs] == [
                    a[0] * 3 + 1 for a in arrays[:20]
                ]
                for y, a in zip(pool.map(x3p1, arrays, zero_copy=True), arrays):
                    assert y[0] == a[0] * 3 + 1
                    del y
            except BaseException as e:  # reported below, with its thread
                errors.append((t, repr(e)))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=300)
        assert not any(th.is_alive() for th in threads), "a thread hangs"
        assert errors == []
        # Futures are waited on from another thread than the one that made them.
        assert all(f.result(timeout=5)[0] % 1 == 0 for f in handed)
        assert pool.restarts() == 0


def test_a_thread_that_submits_is_not_held_up_by_one_that_waits():
    """One thread waits on a slow task while another makes many quick round trips: the waiting
    one gives the pool up to the other at once, instead of at the end of its waits."""
    with mk1.Pool(workers=2) as pool:
        # (Both workers have run a call: the quick ones do not include a worker's start.)
        assert [f.result() for f in [pool.submit(nap, 0.2) for _ in range(2)]] == [0.2] * 2
        slow = pool.submit(slow_sleep, np.array([5.0]))
        waiter = threading.Thread(target=lambda: slow.result(timeout=60))
        waiter.start()
        time.sleep(0.2)  # (the waiter now holds the pool, waiting)
        t0 = time.monotonic()
        for i in range(40):
            assert pool.submit(x3p1, np.full(1, float(i))).result()[0] == i * 3 + 1
        quick = time.monotonic() - t0
        assert not slow.done(), "40 quick round trips ended before the slow task"
        waiter.join(timeout=60)
        assert slow.result()[0] == 5.0
        assert quick < 2.5, quick


def test_closing_from_another_thread_stops_a_running_map_and_fails_waiting_futures():
    pool = mk1.Pool(workers=2)
    try:
        it = pool.map(slow_sleep, (np.array([0.05]) for _ in range(10_000)))
        assert next(it)[0] == 0.05
        fut = pool.submit(slow_sleep, np.array([30.0]))
        closer = threading.Thread(target=pool.terminate)
        closer.start()
        closer.join(timeout=30)
        assert not closer.is_alive()
        with pytest.raises(ValueError, match="closed"):
            for _ in it:
                pass
        with pytest.raises(mk1.Mk1Error, match="terminated"):
            fut.result(timeout=10)
        with pytest.raises(ValueError, match="closed"):
            pool.submit(x3p1, np.ones(1))
    finally:
        pool.terminate()


def test_a_pool_made_in_one_thread_and_dropped_in_another_leaves_nothing():
    box = []
    maker = threading.Thread(target=lambda: box.append(mk1.Pool(workers=1)))
    maker.start()
    maker.join(timeout=120)
    pool = box.pop()
    assert pool.submit(x3p1, np.ones(1)).result()[0] == 4
    pids = pool.worker_pids()
    dropper = threading.Thread(target=lambda p=[pool]: p.clear())
    del pool
    dropper.start()
    dropper.join(timeout=30)
    import gc

    gc.collect()
    deadline = time.monotonic() + 10
    while any(not _gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in pids), "workers of a pool dropped in another thread are left"


def test_the_main_script_as_multiprocessing_runs_it(tmp_path):
    r = run_script(
        tmp_path,
        """
        import argparse, sys
        import numpy as np, mk1

        parser = argparse.ArgumentParser()
        parser.add_argument("n", type=int)
        args = parser.parse_args()          # at top level: workers need the caller's argv

        class ScriptError(Exception):
            pass

        def fails(x):
            raise ScriptError("from the script")

        def shout(x):
            print("hello from worker", mk1.worker_id(), flush=True)
            return x * args.n

        if __name__ == "__main__":
            def nested(x):                  # not in the workers' copy: sent by value
                return x + 100

            with mk1.Pool(workers=1, initializer=lambda: None) as pool:
                print("scaled", pool.submit(shout, np.ones(2)).result()[0])
                print("nested", pool.submit(nested, np.ones(2)).result()[0])
                try:
                    pool.submit(fails, np.ones(2)).result()
                except ScriptError as e:
                    print("caught ScriptError", e)
        """,
    )
    assert r.returncode == 0, r.stderr
    assert "scaled 7.0" in r.stdout
    assert "nested 101.0" in r.stdout
    assert "caught ScriptError from the script" in r.stdout
    assert "hello from worker 0" in r.stdout


def exits_if_negative(x):
    if x[0] < 0:
        os._exit(3)  # the worker dies mid-task, every time it gets this array
    return x * 3 + 1


def test_an_array_that_kills_every_worker_fails_with_worker_died_and_the_pool_goes_on():
    with mk1.Pool(workers=2, max_retries=2) as pool:
        arrays = [np.array([1.0]), np.array([-1.0]), np.array([2.0])]
        got = []
        with pytest.raises(mk1.WorkerDied, match="3 attempt"):
            for y in pool.map(exits_if_negative, arrays):
                got.append(float(y[0]))
        assert got == [4.0]
        assert pool.submit(exits_if_negative, np.array([5.0])).result()[0] == 16.0
        assert restarts_reaching(pool, 3) == 3


def divide_by_zero_at(n):
    for i in range(n):
        yield np.full(4, i, dtype=np.int64)
    raise ZeroDivisionError("the input generator failed")


def test_an_input_that_fails_midway_delivers_what_came_before(pool):
    got = []
    with pytest.raises(ZeroDivisionError, match="input generator"):
        for y in pool.map(x3p1, divide_by_zero_at(20)):
            got.append(int(y[0]))
    assert got == [i * 3 + 1 for i in range(20)]


def test_settings_are_checked_and_a_slow_start_is_allowed():
    with pytest.raises(TypeError):
        mk1.Pool(workers=2.7)
    with pytest.raises(ValueError, match="max_array_bytes"):
        mk1.Pool(workers=1, max_array_bytes=1 << 30)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="> 0"):
            mk1.Pool(workers=1, timeout=bad)
    # Infinity is no limit, as None.
    with mk1.Pool(workers=1, timeout=float("inf"), start_timeout=float("inf")) as p:
        assert p.submit(x3p1, np.ones(1)).result()[0] == 4
    with pytest.raises(mk1.PoolStartError, match="did not attach within .*initializer"):
        mk1.Pool(workers=1, initializer=time.sleep, initargs=(3,), start_timeout=1.0)
    with mk1.Pool(workers=1, initializer=time.sleep, initargs=(1.5,), start_timeout=10) as p:
        assert p.submit(x3p1, np.ones(1)).result()[0] == 4


def _refused_in_a_forked_child(use, exc=ValueError) -> bool:
    """Whether ``use()``, run in a child made by fork(), raises ``exc`` saying that the pool is
    the parent's (the pool is closed there)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            use()
            code = 1  # it should have been refused
        except exc as e:
            if "forked from" not in str(e):
                code = 3  # (it once said "the pool is closed", or "was closed")
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def test_a_forked_child_forgets_the_pool_and_the_parent_keeps_it(pool):
    assert _refused_in_a_forked_child(lambda: pool.submit(x3p1, np.ones(1)).result())
    # A future inherited pending fails there, saying why.
    pending = pool.submit(slow_double, np.ones(2))
    assert _refused_in_a_forked_child(pending.result, mk1.Mk1Error)
    assert pending.result().tolist() == [2.0, 2.0]
    assert pool.submit(x3p1, np.ones(2)).result()[1] == 4
    assert all(os.path.exists(f"/proc/{p}") for p in pool.worker_pids())


def slow_double(x):
    time.sleep(0.05)
    return x * 2


def test_close_gives_every_submitted_future_its_result():
    # Results already back but not yet received count as much as those still running: with
    # a quick function, all four are back before close() looks, and one look collects them.
    for _ in range(5):
        p = mk1.Pool(workers=2)
        futs = [p.submit(x3p1, np.arange(3.0) + i) for i in range(4)]
        time.sleep(0.1)
        p.close()
        assert [f.result().tolist() for f in futs] == [
            [3.0 * (i + k) + 1 for k in range(3)] for i in range(4)
        ]
    with mk1.Pool(workers=2) as p:
        futs = [p.submit(slow_double, np.arange(3.0)) for _ in range(4)]
        futs[0].result()
    assert all(f.result().tolist() == [0.0, 2.0, 4.0] for f in futs)


def test_imap_unordered_delivers_the_arrays_taken_before_a_failing_input(pool):
    got = []
    with pytest.raises(ZeroDivisionError, match="input generator"):
        for y in pool.imap_unordered(slow_double, divide_by_zero_at(3)):
            got.append(int(y[0]))
    assert sorted(got) == [0, 2, 4]


def test_closing_the_pool_inside_the_input_stops_the_map_with_an_error():
    p = mk1.Pool(workers=1)

    def inputs():
        for i in range(10):
            if i == 5:
                p.close()
            yield np.full(3, float(i))

    with pytest.raises(ValueError, match="closed"):
        list(p.map(slow_double, inputs()))


def test_closing_the_pool_inside_an_endless_input_stops_the_map_at_once():
    p = mk1.Pool(workers=1)

    def endless():
        yield np.zeros(3)
        p.close()
        while True:
            yield np.zeros(3)

    t = time.monotonic()
    with pytest.raises(ValueError, match="closed"):
        for _ in p.map(slow_double, endless()):
            pass
    assert time.monotonic() - t < 10


def test_a_forked_child_cannot_drive_its_parents_map(pool):
    it = pool.map(x3p1, (np.full(4, float(i)) for i in range(2000)))
    assert next(it)[0] == 1.0
    assert _refused_in_a_forked_child(lambda: next(it))
    rest = [y[0] for y in it]
    assert rest == [3.0 * i + 1 for i in range(1, 2000)]


_KEPT = []


def keeps_its_input(x):
    _KEPT.append(x)
    return x * 2


def keeps_in_a_cycle_only(x):
    holder = {"x": x}
    holder["self"] = holder  # garbage once the function returns
    return x * 2


def test_a_function_that_keeps_its_input_fails_and_its_worker_is_replaced():
    with mk1.Pool(workers=1) as p:
        before = p.restarts()
        with pytest.raises(mk1.Mk1Error, match="kept a reference to its input or output"):
            p.submit(keeps_its_input, np.ones(4)).result()
        # The replacement works (the pool replaces a worker once the caller has seen it go,
        # here in this call), and a cycle that is garbage is not a kept reference.
        assert p.submit(x3p1, np.ones(4)).result().tolist() == [4.0] * 4
        assert p.submit(keeps_in_a_cycle_only, np.ones(4)).result().tolist() == [2.0] * 4
        assert restarts_reaching(p, before + 1) == before + 1


def test_in_place_a_function_that_keeps_its_array_fails_too():
    with mk1.Pool(workers=1, mode="in-place") as p:
        with pytest.raises(mk1.Mk1Error, match="kept a reference to its input or output"):
            p.submit(keeps_its_input, np.ones(4)).result()
        assert p.submit(keeps_in_a_cycle_only, np.ones(4)).result().tolist() == [2.0] * 4
        assert p.submit(x3p1, np.ones(4)).result().tolist() == [4.0] * 4


def forks_and_returns(x):
    os.fork()  # both processes return from here
    return x + 1


_THREADS = None


def sums_in_threads(x):
    global _THREADS
    if _THREADS is None:
        import concurrent.futures

        _THREADS = concurrent.futures.ThreadPoolExecutor(4)
    return np.array(list(_THREADS.map(np.sum, np.array_split(x, 4))))


def test_a_function_that_runs_threads_on_its_input_is_not_blamed(pool):
    before = pool.restarts()
    for i in range(30):
        y = pool.submit(sums_in_threads, np.arange(1000.0) + i).result()
        assert y.sum() == (np.arange(1000.0) + i).sum()
    assert pool.restarts() == before


def scribbles_out_forever(x, out):
    out[:] = x + 1

    def scribble():
        while True:
            out.fill(-1.0)

    threading.Thread(target=scribble, daemon=True).start()


def test_a_thread_left_writing_its_output_never_reaches_another_task():
    with mk1.Pool(workers=2) as p:
        bad = p.submit(scribbles_out_forever, np.ones(64))
        good = list(p.map(x3p1, [np.full(64, float(i)) for i in range(300)]))
        assert all((g == 3.0 * i + 1).all() for i, g in enumerate(good))
        with pytest.raises(mk1.Mk1Error):
            bad.result()


def forks_a_late_writer(x, out):
    if os.fork() == 0:
        time.sleep(0.02)  # the worker has answered; the slot now holds another task's data
        try:
            out[...] = -1.0  # faults: a forked child has no access to the slots
        finally:
            os._exit(0)
    out[...] = x + 1


def test_a_child_forked_by_the_function_cannot_write_any_slot():
    with mk1.Pool(workers=2, slots=4) as pool:
        arrays = [np.full(512, float(i)) for i in range(120)]
        for i, y in enumerate(pool.map(forks_a_late_writer, arrays)):
            assert (y == i + 1).all(), f"array {i} was overwritten: {y[:4]}"
        assert [y[0] for y in pool.map(x3p1, arrays)] == [i * 3 + 1 for i in range(120)]
        assert pool.restarts() == 0


def test_a_child_forked_by_the_function_does_not_serve(pool):
    out = [y.tolist() for y in pool.map(forks_and_returns, [np.full(2, float(i)) for i in range(20)])]
    assert out == [[i + 1.0] * 2 for i in range(20)]
    assert pool.submit(x3p1, np.ones(2)).result().tolist() == [4.0, 4.0]


def test_futures_get_copies_while_a_zero_copy_map_runs():
    with mk1.Pool(workers=1, slots=2) as p:
        futs = [p.submit(slow_double, np.full(3, float(i))) for i in range(2)]
        for y in p.map(x3p1, [np.ones(3)] * 4, zero_copy=True):
            assert not y.flags.writeable
        for i, f in enumerate(futs):
            r = f.result()
            assert r.flags.writeable and r.tolist() == [2.0 * i] * 3


def test_zero_copy_results_dropped_in_other_threads_give_their_slots_back():
    import threading

    sums = []

    def use(y):
        time.sleep(0.01)  # until the map has moved on: this thread drops the last reference
        sums.append(float(y.sum()))

    with mk1.Pool(workers=1, slots=4) as p:
        last = None
        for y in p.map(x3p1, [np.ones(8)] * 40, zero_copy=True):
            t = threading.Thread(target=use, args=(y,))
            t.start()
            del y
            if last is not None:
                last.join()
            last = t
        last.join()
        assert sums == [32.0] * 40
        assert p.submit(x3p1, np.ones(2)).result().tolist() == [4.0, 4.0]


def test_zero_copy_needs_two_slots():
    with mk1.Pool(workers=1, slots=1) as p:
        with pytest.raises(ValueError, match="zero_copy=True needs slots"):
            p.map(x3p1, [np.ones(3)], zero_copy=True)
        assert [y.tolist() for y in p.map(x3p1, [np.ones(2)] * 3)] == [[4.0, 4.0]] * 3


def test_op_parameters_may_be_numpy_scalars(pool):
    a = np.arange(4.0)
    assert (pool.submit(mk1.ops.add(np.float64(1.5)), a).result() == a + 1.5).all()
    assert (pool.submit(mk1.ops.mul(np.float32(2.0)), a).result() == a * 2).all()
    i = np.arange(4, dtype=np.int32)
    assert (pool.submit(mk1.ops.add(np.int64(3)), i).result() == i + 3).all()
    with pytest.raises(TypeError):
        mk1.ops.add(np.bool_(True))


NESTED_SCRIPT = """
    import sys
    sys.modules["cloudpickle"] = None  # as if it were not installed
    import numpy as np, mk1

    if __name__ == "__main__":
        def nested(x):
            return x + 1
        with mk1.Pool(workers=1) as pool:
            try:
                pool.submit(nested, np.ones(3)).result()
                print("no error")
            except TypeError as e:
                print("TypeError", e)
"""


def test_a_function_defined_under_the_main_guard_without_cloudpickle_is_a_type_error(tmp_path):
    r = run_script(tmp_path, NESTED_SCRIPT)
    assert r.returncode == 0, r.stderr
    assert "TypeError" in r.stdout and "__main__" in r.stdout, r.stdout


def test_a_script_read_from_stdin(tmp_path):
    body = """
        import numpy as np, mk1

        import functools

        def f(x, k=1):
            return x * k + 1

        def init(k):
            pass

        # A function of this script inside what is sent (a partial's, an initializer's) too:
        # the workers cannot run a script from stdin, so it goes by value as well.
        for fn, init in ((f, None), (functools.partial(f, k=2), functools.partial(init, 1))):
            try:
                with mk1.Pool(workers=1, initializer=init) as pool:
                    print("result", pool.submit(fn, np.arange(3.0)).result().tolist())
            except (TypeError, mk1.PoolStartError) as e:
                print("TypeError", e)
        """
    r = run_script(tmp_path, body, stdin=True)
    assert r.returncode == 0, r.stderr
    try:
        import cloudpickle  # noqa: F401

        assert "result [1.0, 2.0, 3.0]" in r.stdout, r.stdout + r.stderr
        assert "result [1.0, 3.0, 5.0]" in r.stdout, r.stdout + r.stderr
    except ImportError:
        assert r.stdout.count("TypeError") == 2 and "interactive" in r.stdout, r.stdout


def test_ctrl_c_while_the_pool_starts_stops_the_start(tmp_path):
    # An initializer that takes a minute: Ctrl-C two seconds in ends the start at once (it
    # used to wait for the start to finish or time out), and no worker is left.
    ready = tmp_path / "ready"
    proc = start_script(
        tmp_path,
        f"""
        import time, mk1

        if __name__ == "__main__":
            with open({str(ready)!r}, "w") as f:
                f.write("1")
            mk1.Pool(workers=2, initializer=time.sleep, initargs=(60,), start_timeout=120)
            print("started")
        """,
        ready,
    )
    time.sleep(2)  # the workers are in the initializer now
    kids = _children(proc.pid)
    assert len(kids) >= 2, "the workers were started"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 10, "the start was not given up"
    assert "KeyboardInterrupt" in err and "started" not in out, (out, err)
    for pid in kids:
        assert _gone_soon(pid), pid


def test_as_completed_refuses_another_pools_future(pool):
    with mk1.Pool(workers=1) as other:
        theirs = other.submit(x3p1, np.ones(2))
        ours = pool.submit(x3p1, np.ones(2))
        with pytest.raises(ValueError, match="another pool"):
            list(pool.as_completed([ours, theirs]))
        assert theirs.result().tolist() == [4.0, 4.0]
        assert ours.result().tolist() == [4.0, 4.0]


@pytest.mark.parametrize("closed", [(0,), (2,), (0, 1, 2)])
def test_a_process_with_standard_streams_closed_runs_a_pool(tmp_path, closed):
    # A daemon, `python script.py <&-`: the segment's descriptor would get number 0, 1 or 2,
    # which a worker's standard streams replace before it starts.
    result = tmp_path / "result.txt"
    r = run_script(
        tmp_path,
        f"""
        import os
        import numpy as np, mk1

        def double(x):
            return x * 2

        if __name__ == "__main__":
            for fd in {closed!r}:
                os.close(fd)
            with mk1.Pool(workers=2) as pool:
                out = list(pool.map(double, [np.arange(5.0) + i for i in range(20)]))
                ops = list(pool.map(mk1.ops.add(1), [np.arange(5.0)] * 4))
            ok = all((o == (np.arange(5.0) + i) * 2).all() for i, o in enumerate(out))
            ok = ok and all((o == np.arange(5.0) + 1).all() for o in ops)
            with open({str(result)!r}, "w") as f:
                f.write(f"ok {{ok}}")
        """,
    )
    assert r.returncode == 0, r.stderr
    assert result.read_text() == "ok True"


# -- calls: any arguments, any result -------------------------------------------------------


def weighted_sum(a, b, weight=1.0):
    return a + weight * b


def describe(x, label="x"):
    return {
        "label": label,
        "shape": x.shape,
        "mean": float(x.mean()),
        "double": x * 2,
        "read_only": not x.flags.writeable,
    }


def views_of_shared_memory(*arrays, nested=()):
    """What a function sees of its array arguments: read-only, not its own copies."""
    seen = list(arrays) + [a for group in nested for a in group]
    return [(a.flags.writeable, a.flags.owndata, a.dtype.str, a.shape) for a in seen]


def echo(*args, **kwargs):
    return args, kwargs


def first_argument(a, *rest):
    return a


def labelled_check(x, label):
    return label, raises_custom(x)


def returns_a_generator(x):
    return (i for i in range(3))


def returns_none(x):
    assert x.size >= 0


def big_result(n):
    return {"data": np.zeros(n, np.uint8)}


_KEPT_ARGUMENTS = []


def keeps_its_second_argument(a, b):
    _KEPT_ARGUMENTS.append(b)
    return a.sum()


def test_calls_take_any_arguments_and_return_any_result(pool):
    a = np.arange(10.0)
    b = np.ones(10)
    np.testing.assert_array_equal(pool.submit(weighted_sum, a, b, weight=2).result(), a + 2)
    np.testing.assert_array_equal(pool.submit(weighted_sum, a, b).result(), a + 1)
    d = pool.submit(describe, np.arange(6, dtype=np.int16).reshape(2, 3), label="six").result()
    assert d["label"] == "six" and d["shape"] == (2, 3) and d["mean"] == 2.5
    assert d["read_only"], "out of place, arrays in the arguments are read-only in the worker"
    np.testing.assert_array_equal(d["double"], np.arange(6).reshape(2, 3) * 2)
    assert d["double"].flags.writeable, "a result's arrays are the caller's own"
    # One argument that is not an array mk1 carries: the function gets it as it is.
    assert pool.submit(len, "hello").result() == 5
    assert pool.submit(float, 3).result() == 3.0
    z = np.array([1 + 2j, 3 - 1j], np.complex128)
    np.testing.assert_array_equal(pool.submit(np.conj, z).result(), np.conj(z))
    flags = np.array([True, False, True])
    assert pool.submit(np.count_nonzero, flags).result() == 2
    big_endian = np.arange(5, dtype=">i4")
    back = pool.submit(first_argument, big_endian).result()
    assert back.dtype.str == ">i4" and back.tolist() == list(range(5))
    five_d = np.zeros((1, 2, 1, 2, 1))
    assert pool.submit(first_argument, five_d).result().shape == (1, 2, 1, 2, 1)
    # Lists and masked arrays arrive as they are (numpy would have made a list an array, and
    # dropped a mask).
    assert pool.submit(first_argument, [1, 2, 3]).result() == [1, 2, 3]
    masked = np.ma.masked_array([1.0, 2.0, 3.0], mask=[False, True, False])
    back = pool.submit(first_argument, masked).result()
    assert isinstance(back, np.ma.MaskedArray) and back.mask.tolist() == [False, True, False]
    # No arguments at all, keywords only, None as a result, nested containers.
    args, kwargs = pool.submit(echo).result()
    assert args == () and kwargs == {}
    args, kwargs = pool.submit(echo, k=[np.ones(2), {"s": "t"}]).result()
    assert args == () and kwargs["k"][1] == {"s": "t"} and kwargs["k"][0].tolist() == [1, 1]
    assert pool.submit(returns_none, np.ones(3)).result() is None
    assert pool.submit(returns_none, x=np.ones(3)).result() is None


def test_a_memmap_is_carried_as_an_array(pool, tmp_path):
    m = np.memmap(tmp_path / "m.dat", dtype=np.float32, mode="w+", shape=(4, 5))
    m[:] = np.arange(20).reshape(4, 5)
    m.flush()
    y = pool.submit(x3p1, m).result()
    assert type(y) is np.ndarray and y.tolist() == (np.arange(20).reshape(4, 5) * 3 + 1).tolist()
    del m


def test_arrays_in_a_calls_arguments_are_views_of_shared_memory(pool):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    strided = np.arange(40, dtype=np.int64).reshape(4, 10)[:, ::3]
    fortran = np.asfortranarray(np.arange(6, dtype=np.uint16).reshape(2, 3))
    seen = pool.submit(views_of_shared_memory, a, strided, fortran, nested=[[np.ones(3)]]).result()
    for writeable, owndata, _, _ in seen:
        assert not writeable and not owndata
    assert [s[2:] for s in seen] == [
        ("<f4", (3, 4)),
        ("<i8", (4, 4)),
        ("<u2", (2, 3)),
        ("<f8", (3,)),
    ]
    # The values arrive intact, whatever the layout was.
    back = pool.submit(echo, a, strided, fortran).result()[0]
    np.testing.assert_array_equal(back[0], a)
    np.testing.assert_array_equal(back[1], strided)
    np.testing.assert_array_equal(back[2], fortran)


def test_map_over_several_iterables_starmap_and_items_that_are_not_arrays(pool):
    xs = [np.full(5, float(i)) for i in range(50)]
    ys = [np.full(5, 10.0 * i) for i in range(60)]  # longer: the map stops at the shortest
    got = list(pool.map(weighted_sum, xs, ys))
    assert len(got) == 50
    for i, r in enumerate(got):
        np.testing.assert_array_equal(r, np.full(5, 11.0 * i))
    unordered = dict(
        (int(r[0]) // 11, r) for r in pool.imap_unordered(weighted_sum, xs, ys)
    )
    assert sorted(unordered) == list(range(50))
    starred = list(pool.starmap(weighted_sum, ((x, y, 0.5) for x, y in zip(xs, ys))))
    assert [float(r[0]) for r in starred] == [6.0 * i for i in range(50)]
    assert list(pool.map(len, ["a", "bb", "ccc"])) == [1, 2, 3]
    assert list(pool.map(float, range(300))) == [float(i) for i in range(300)]
    # A plain map over arrays whose function returns something else than an array.
    stats = list(pool.map(describe, xs[:20]))
    assert [s["mean"] for s in stats] == [float(i) for i in range(20)]
    # Zero-copy: the result's arrays are read-only views of shared memory.
    for i, d in enumerate(pool.map(describe, xs[:30], zero_copy=True)):
        assert not d["double"].flags.writeable and d["double"][0] == 2.0 * i
        del d
    with pytest.raises(TypeError, match="at least one iterable"):
        pool.map(len)
    with pytest.raises(TypeError, match="built-in op"):
        pool.map(mk1.ops.affine(3, 1), xs, ys)
    with pytest.raises(TypeError, match="built-in op"):
        list(pool.map(mk1.ops.affine(3, 1), ["not an array"]))


def test_failures_of_calls_and_their_results(pool):
    with pytest.raises(CustomError, match="negative"):
        pool.submit(raises_custom, x=np.array([-1.0])).result()
    with pytest.raises(TypeError, match="generator"):
        pool.submit(returns_a_generator, "x").result()
    with pytest.raises(TypeError, match="generator"):
        pool.submit(returns_a_generator, np.ones(2)).result()
    with pytest.raises(mk1.ArrayTooLarge, match="result takes"):
        pool.submit(big_result, 2 << 20).result()
    with pytest.raises(mk1.ArrayTooLarge, match="arguments take"):
        pool.submit(weighted_sum, np.zeros(1 << 20), np.zeros(1 << 20))
    with pytest.raises(TypeError, match="cannot send"):
        pool.submit(weighted_sum, np.ones(2), threading.Lock())  # an argument that never pickles
    # In a map, the failing call ends the iteration where it is, as for arrays.
    got = _taken_until(
        pool.map(labelled_check, [np.array([1.0]), np.array([-2.0])], ["a", "b"]),
        CustomError,
    )
    assert len(got) == 1
    assert pool.submit(weighted_sum, 1, 2).result() == 3, "the pool goes on"


def test_a_call_that_keeps_an_argument_fails_and_its_worker_is_replaced():
    with mk1.Pool(workers=1) as p:
        with pytest.raises(mk1.Mk1Error, match="kept a reference"):
            p.submit(keeps_its_second_argument, np.ones(4), np.ones(3)).result()
        assert p.submit(weighted_sum, np.ones(2), np.ones(2)).result().tolist() == [2.0, 2.0]


def test_calls_in_place():
    with mk1.Pool(workers=1, mode="in-place") as p:
        a = np.arange(1000, dtype=np.float64)
        # The result is the argument itself, in the very slot memory it goes back through.
        np.testing.assert_array_equal(p.submit(first_argument, a, "x").result(), a)
        np.testing.assert_array_equal(p.submit(weighted_sum, a, a, weight=3).result(), 4 * a)
        assert p.submit(describe, a).result()["mean"] == a.mean()


def test_a_garbled_bundle_is_an_error_never_a_crash():
    from mk1 import _args

    call = ((np.arange(5.0), "s"), {"k": np.ones(2, np.int8)})
    good = _args.calls(3, [call], 1 << 20).array()
    number, [(args, kwargs)], block = _args.read_calls(good)
    assert number == 3 and args[1] == "s" and kwargs["k"].sum() == 2 and not block
    assert args[0].tolist() == [0, 1, 2, 3, 4]
    assert _args.is_bundle(good)
    assert not _args.is_bundle(np.zeros(100, np.uint8))
    assert not _args.is_bundle(good.astype(np.int16))
    for bad in (good[:10], good[:39], np.zeros(64, np.uint8)):
        with pytest.raises(ValueError):
            _args.read(bad)
    with pytest.raises(ValueError, match="not results"):
        _args.read_results(good)
    _read_garbled_calls(good, seed=7)


def _read_garbled_calls(good, seed):
    """Reads 2 000 copies of the calls bundle ``good``, each with 1 to 3 random bytes garbled
    and cut at a random length: a garbled header must raise ``ValueError``, anything else
    may only raise that."""
    from mk1 import _args

    rng = np.random.default_rng(seed)
    for _ in range(2000):
        b = good.copy()
        at = rng.integers(24, len(b), size=rng.integers(1, 4))
        b[at] = rng.integers(0, 256, size=len(at))
        with pytest.raises(ValueError) if at.min() < 40 else _maybe_raises():
            _args.read_calls(b[: rng.integers(40, len(b) + 1)])


class _maybe_raises:
    """A garbled byte may land where it changes nothing; any error must be a ValueError."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is None or issubclass(kind, ValueError)


def _array_of(k, text, shape, order):
    from mk1 import _args

    return _args._array, (k, text, shape, order)


class _Forged:
    """Unpickles as a call of ``mk1._args._array`` with any arguments (a hostile worker)."""

    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return _array_of(*self.args)


def test_a_forged_array_reference_is_a_value_error():
    from mk1 import _args

    for args in (
        (5, "<f8", (1,), "C"),  # no such array
        (-1, "<f8", (1,), "C"),
        (True, "<f8", (1,), "C"),
        (0, "|O", (1,), "C"),  # an object dtype would read pointers
        (0, "<f8", (1 << 40,), "C"),  # larger than its bytes
        (0, "<f8", (-1,), "C"),
        (0, "<f8", (1.5,), "C"),
        (0, "<f8", (1,), "CF"),
        (0, "<f8", (1,), None),
        (0, ["unhashable"], (1,), "C"),
    ):
        w = _args.Writer(1 << 20)
        w.add(((np.ones(4),), {}))  # array 0: 32 bytes
        w.add(_Forged(*args))
        with pytest.raises(ValueError, match="garbled"):
            _args.read(w.array())


# -- calls in maps go several to a slot ----------------------------------------------------


def fails_at_seven(i, x):
    if i == 7:
        raise CustomError(i, "seven")
    return i, float(x.sum())


def sleeps_then(seconds, tag):
    time.sleep(seconds)
    return tag


def exits_once(i, marker):
    """Kills its worker the first time call 150 runs (the marker file says it ran)."""
    if i == 150 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)
    return i * 2


def calls_failing_after(n):
    for i in range(n):
        yield i, np.full(3, float(i))
    raise ZeroDivisionError("the input generator failed")


def test_a_failing_call_in_a_batch_fails_alone_and_ends_the_map_where_it_is(pool):
    calls = [(i, np.ones(4)) for i in range(400)]
    got = _taken_until(pool.starmap(fails_at_seven, calls), CustomError, match="seven")
    assert got == [(i, 4.0) for i in range(7)]
    # Unordered: every other call still comes back.
    seen, failed = set(), 0
    it = pool.imap_unordered(fails_at_seven, range(400), [np.ones(2)] * 400)
    while True:
        try:
            seen.add(next(it)[0])
        except CustomError:
            failed += 1
            break
        except StopIteration:
            break
    assert failed == 1 and 7 not in seen
    # An input that fails midway: the calls taken before it come back first.
    got = []
    with pytest.raises(ZeroDivisionError, match="input generator"):
        for r in pool.starmap(fails_at_seven, calls_failing_after(5)):
            got.append(r[0])
    assert got == list(range(5))


def test_batches_too_large_for_a_slot_are_split_and_zero_copy_results_are_lent():
    with mk1.Pool(workers=2, max_array_bytes=1 << 20) as p:
        # 300 quick calls of 100 KB each: batches grow past a slot and are split to fit.
        arrays = [np.full(25_000, float(i), np.float32) for i in range(300)]
        out = list(p.map(weighted_sum, arrays, arrays))
        assert [float(y[0]) for y in out] == [2.0 * i for i in range(300)]
        assert all(y.shape == (25_000,) for y in out)
        for i, d in enumerate(p.starmap(describe, ((a,) for a in arrays), zero_copy=True)):
            assert not d["double"].flags.writeable and d["mean"] == float(i)
            del d


def test_a_worker_killed_mid_batch_is_replaced_and_every_call_comes_back(tmp_path):
    marker = str(tmp_path / "killed")
    with mk1.Pool(workers=2) as p:
        got = list(p.map(exits_once, range(400), [marker] * 400))
        assert got == [2 * i for i in range(400)]
        assert os.path.exists(marker)


def test_under_a_timeout_a_hung_call_fails_alone():
    with mk1.Pool(workers=1, timeout=2.0) as p:
        got = _taken_until(
            p.starmap(sleeps_then, [(0, "a"), (0, "b"), (30, "hung"), (0, "c")]),
            mk1.TaskTimeout,
        )
        assert got == ["a", "b"]
        assert p.submit(sleeps_then, 0, "after").result() == "after"


def test_the_batch_sizer_and_garbled_results():
    from mk1 import _args, _pool

    sizer = _pool._BatchSizer(True, 1 << 20)
    r = _args.Results(1 << 20, 3)
    r.add((_args.OK, 1))
    r.add((_args.FAILED, "e"))
    r.again()
    number, entries, plain, block = _pool._batch_entries(r.finish(9, 0.001).array(), sizer)
    assert number == 9 and entries == [(0, 1), (1, "e"), (2, None)] and not plain
    assert not block
    # Every entry OK: the results themselves, read in the same pass.
    r = _args.Results(1 << 20, 2)
    r.add((_args.OK, {"a": 1}))
    r.add((_args.OK, [2]))
    got = _args.read_results(r.finish(4, 0.001).array())
    assert got == (4, 0.001, [{"a": 1}, [2]], False, True)
    assert sizer.size == 4, "2 calls ran in 1 ms: 4 fill the 2 ms a slot aims at"
    sizer.record_bytes(300_000, 1)
    assert sizer.size == 2, "calls of 300 kB: 2 fill three quarters of a 1 MiB slot"
    assert _pool._BatchSizer(False, 1 << 20).size == 1
    for bad in (("results", 1, 0.1, 5), ("calls", 1, 0), 42, None):
        w = _args.Writer(1 << 20)
        w.add(bad)
        with pytest.raises(mk1.Mk1Error, match="cannot be read"):
            _pool._batch_entries(w.array(), sizer)


def forks_and_returns_a_pair(i, x):
    os.fork()  # both processes return from here; the child must not go on with the batch
    return i, x + 1


def keeps_an_argument_sometimes(i, x):
    if i == 40:
        _KEPT_ARGUMENTS.append(x)
    return i


def test_calls_that_fork_or_keep_an_argument_in_a_batch():
    with mk1.Pool(workers=2) as p:
        got = list(p.starmap(forks_and_returns_a_pair, ((i, np.full(2, float(i))) for i in range(60))))
        assert [(i, x.tolist()) for i, x in got] == [(i, [i + 1.0] * 2) for i in range(60)]
        assert p.submit(weighted_sum, 1, 2).result() == 3
        # A call that keeps an argument fails its whole slot (and its worker is replaced): the
        # map raises there, after the results before it.
        got = _taken_until(
            p.starmap(keeps_an_argument_sometimes, ((i, np.ones(3)) for i in range(200))),
            mk1.Mk1Error,
            match="kept a reference",
        )
        assert got == list(range(len(got))) and len(got) <= 40
        assert list(p.starmap(weighted_sum, [(1, 2), (3, 4)])) == [3, 7]


def test_calls_in_place_in_batches():
    with mk1.Pool(workers=2, mode="in-place") as p:
        arrays = [np.full(100, float(i)) for i in range(300)]
        got = list(p.starmap(first_argument, ((a, "x") for a in arrays)))
        assert [float(y[0]) for y in got] == [float(i) for i in range(300)]
        got = list(p.map(weighted_sum, arrays, arrays))
        assert [float(y[-1]) for y in got] == [2.0 * i for i in range(300)]


def what_it_got(x):
    return type(x).__name__, getattr(x, "dtype", None) and str(x.dtype)


def test_a_map_of_arrays_takes_odd_items_as_calls_of_their_own(pool):
    items = [np.ones(2), 3, "s", np.ones(2, bool), [1, 2], np.zeros((1, 1, 1, 1, 1)), np.ones(3)]
    assert list(pool.map(what_it_got, items)) == [
        ("ndarray", "float64"),
        ("int", None),
        ("str", None),
        ("ndarray", "bool"),
        ("list", None),
        ("ndarray", "float64"),
        ("ndarray", "float64"),
    ]
    # A uint8 array that is not a bundle is an array (only this process's bundles are calls).
    raw = np.frombuffer(b"mk1args\x01" + bytes(100), np.uint8)
    assert pool.submit(first_argument, raw).result().tobytes() == raw.tobytes()
    assert list(pool.map(first_argument, [raw, 5]))[0].tobytes() == raw.tobytes()


# -- from a review: batches behave as calls one by one ----------------------------------------


def a_mebibyte(i):
    return np.full(1 << 17, float(i))  # 1 MiB


def lock_at(i, n):
    return threading.Lock() if i == n else i


def appends_one(xs):
    xs.append(1)
    return len(xs)


def bump(x):
    x += 1
    return float(x[0])


def worker_after(seconds):
    time.sleep(seconds)
    return mk1.worker_id()


def small_and_large(i):
    return np.full(1, i), np.ones(16384)


def locks_from(n):
    for i in range(n):
        yield i
    yield threading.Lock()
    yield n + 1


def test_each_call_of_a_batch_gets_its_own_result_whatever_the_others_return():
    with mk1.Pool(workers=2) as p:
        # 300 results of 1 MiB: quick calls, batched, whose results would overflow a slot.
        got = list(p.map(a_mebibyte, range(300)))
        assert [float(y[0]) for y in got] == [float(i) for i in range(300)]
        assert all(y.shape == (1 << 17,) for y in got)
        # A result that does not pickle fails its call alone, in its turn.
        got = _taken_until(
            p.starmap(lock_at, ((i, 3000) for i in range(5000))),
            TypeError,
            match="cannot send <unlocked",  # (the result itself, not mk1's entry around it)
        )
        assert got == list(range(3000))
        # An input that does not pickle: the calls before it come back, then its error.
        got = _taken_until(p.map(first_argument, locks_from(3000)), TypeError, match="input 3000")
        assert got == list(range(3000))


def test_calls_of_a_batch_share_nothing():
    with mk1.Pool(workers=1) as p:
        assert set(p.map(appends_one, [[]] * 300)) == {1}
        # (Within one call, an object passed twice is still one object, as pickle keeps it.)
        shared = [np.zeros(3)]
        assert all(args[0] is args[1] for args, _ in p.starmap(echo, [(shared, shared)] * 3))
    with mk1.Pool(workers=1, mode="in-place") as p:
        a = np.zeros(4)
        assert set(p.starmap(bump, [(a,)] * 300)) == {1.0}
        assert a.tolist() == [0.0] * 4


def test_a_batch_that_runs_long_spreads_its_calls_over_the_workers():
    with mk1.Pool(workers=2) as p:
        # Quick calls size the batches large; then slow ones come, 64 to a batch, and a
        # worker that finds its batch running long leaves the rest to be run one to a slot.
        delays = [0.0] * 3000 + [0.03] * 64
        seen = list(p.map(worker_after, delays))
        assert set(seen[3000:]) == {0, 1}


def test_a_kept_result_of_a_batch_is_an_array_of_its_own():
    with mk1.Pool(workers=1) as p:
        kept = [small for small, _ in p.map(small_and_large, range(500))]
        assert all(k.base is None and k.flags.writeable for k in kept)
        assert [int(k[0]) for k in kept] == list(range(500))


def features_and_debug(i):
    i = float(np.asarray(i).reshape(-1)[0])
    return {"features": np.full(4, i), "debug": np.ones(100_000), "mid": np.ones(10)}


def test_a_small_array_kept_from_a_large_result_holds_only_itself():
    # A result of several arrays: each small one kept is an array of its own, not a view that
    # holds the whole result's bytes (800 kB here) for as long as it is kept.
    with mk1.Pool(workers=2) as p:
        ways = {
            "submit": lambda: [p.submit(features_and_debug, i).result() for i in range(50)],
            "apply_async": lambda: [
                p.apply_async(features_and_debug, (i,)).get() for i in range(50)
            ],
            "map over arrays": lambda: list(
                p.map(features_and_debug, [np.full(1, i) for i in range(50)])
            ),
            "imap_unordered": lambda: sorted(
                p.imap_unordered(features_and_debug, range(50)),
                key=lambda r: r["features"][0],
            ),
        }
        for way, run in ways.items():
            results = run()
            kept = [r["features"] for r in results]
            assert [int(k[0]) for k in kept] == list(range(50)), way
            assert all(k.base is None and k.flags.writeable for k in kept), way
            assert all(r["mid"].base is None for r in results), way
            del results
            gc.collect()
            assert all(k.nbytes == 32 and k.sum() == 4 * k[0] for k in kept), way
        # The large array of a call's result, most of its bytes, is still a view (no second
        # copy; results of batched calls are arrays of their own anyway).
        assert p.submit(features_and_debug, 1).result()["debug"].base is not None


def test_a_call_exactly_at_max_array_bytes_fits_in_submit_and_in_a_map():
    from mk1 import _args

    most = 1 << 16
    limit = most + _args.ROOM  # (what a call may take: see its error below)
    size = _args.calls(-1, [((b"",), {})], 1 << 30).nbytes
    n = limit - size
    while _args.calls(-1, [((b"x" * n,), {})], 1 << 30).nbytes != limit:
        n += limit - _args.calls(-1, [((b"x" * n,), {})], 1 << 30).nbytes
    with mk1.Pool(workers=1, max_array_bytes=most) as p:
        # Arguments of max_array_bytes fit, with keywords and all.
        whole = np.zeros(most, np.uint8)
        assert p.submit(weighted_sum, whole, whole[:1], weight=2).result().shape == (most,)
        big = b"x" * n
        assert p.submit(len, big).result() == n
        assert list(p.map(len, [big])) == [n]
        assert list(p.map(len, [big, big, big])) == [n] * 3
        with pytest.raises(mk1.ArrayTooLarge, match=f"arguments take {limit + 1} .* {limit}"):
            p.submit(len, big + b"x").result()


def test_built_in_ops_take_lists_and_odd_subclasses_stay_whole(pool):
    op = mk1.ops.affine(3, 1)
    assert pool.submit(op, [1.0, 2.0]).result().tolist() == [4.0, 7.0]
    assert [y.tolist() for y in pool.map(op, [[1.0, 2.0], np.ones(2)])] == [[4.0, 7.0], [4.0, 4.0]]
    m = np.ma.masked_array([1.0, 2.0, 100.0], mask=[False, False, True])
    got = list(pool.map(what_it_got, [np.ones(3), m]))
    assert got[1] == ("MaskedArray", "float64")


def test_zero_copy_results_are_read_only_whichever_thread_received_them():
    with mk1.Pool(workers=2) as p:
        stop = threading.Event()

        def other_thread():
            while not stop.is_set():
                p.submit(x3p1, np.ones(2)).result()  # receives completions of the map too, as copies

        t = threading.Thread(target=other_thread)
        t.start()
        try:
            arrays = [np.full(64, float(i)) for i in range(400)]
            for i, y in enumerate(p.map(x3p1, arrays, zero_copy=True)):
                assert not y.flags.writeable and y[0] == 3 * i + 1
                del y
            for i, d in enumerate(p.map(describe, arrays, zero_copy=True)):
                assert not d["double"].flags.writeable and d["mean"] == float(i)
                del d
        finally:
            stop.set()
            t.join()


def dies_at(i, n):
    if i == n:
        os._exit(4)
    return i


def test_a_call_that_kills_its_worker_fails_alone_in_its_batch():
    for mode in ("out-of-place", "in-place"):
        with mk1.Pool(workers=2, mode=mode) as p:
            got = _taken_until(p.starmap(dies_at, ((i, 400) for i in range(600))), mk1.WorkerDied)
            assert got == list(range(400)), mode
            assert p.submit(dies_at, 1, 0).result() == 1, "the pool goes on"


def test_close_from_another_thread_stops_endless_maps_of_arrays_and_of_calls():
    import itertools

    for make in (
        lambda p: p.map(x3p1, (np.ones(4) for _ in itertools.count())),
        lambda p: p.starmap(sleeps_then, ((0.001, i) for i in itertools.count())),
    ):
        p = mk1.Pool(workers=2)
        outcome = []
        going = threading.Event()

        def consume(p=p, make=make, outcome=outcome, going=going):
            n = 0
            try:
                for _ in make(p):
                    n += 1
                    going.set()
            except ValueError as e:
                outcome.append((n, str(e)))

        t = threading.Thread(target=consume)
        t.start()
        assert going.wait(30)
        p.close()  # returns once what was given has come back: the map gives no more
        t.join(10)
        assert not t.is_alive()
        assert outcome and outcome[0][0] > 0 and "closed" in outcome[0][1]
        with pytest.raises(ValueError, match="closed"):
            p.submit(x3p1, np.ones(2))


def _keep_lent_results_until_the_map_stops(pool, arrays):
    kept = []
    try:
        for y in pool.map(x3p1, arrays, zero_copy=True):
            kept.append(y)
    except mk1.Mk1Error:
        return len(kept)


def test_lent_results_dropped_after_an_error_free_their_slots_without_the_garbage_collector():
    import gc

    with mk1.Pool(workers=2, slots=4) as p:
        gc.disable()
        try:
            arrays = [np.ones(8) for _ in range(20)]
            assert _keep_lent_results_until_the_map_stops(p, arrays) >= 1
            # Every lent result is gone with the function's frame: the slots are free.
            assert [y[0] for y in p.map(x3p1, arrays)] == [4.0] * 20
        finally:
            gc.enable()


def grows_at(i, n):
    return np.full(10 if i < n else 150_000, float(i))


def test_calls_left_by_a_batch_run_again_while_zero_copy_results_wait():
    # Quick calls with small results size the batches large; then the results grow (1.2 MB
    # each, three to a slot), so each batch leaves most of its calls to be run again one to a
    # slot, while the map's other lent results wait for their turn holding slots.
    for slots in (3, 8):
        with mk1.Pool(workers=2, slots=slots) as p:
            n = 0
            for i, y in enumerate(p.starmap(grows_at, ((i, 600) for i in range(800)), zero_copy=True)):
                assert y[0] == float(i) and y.size == (10 if i < 600 else 150_000)
                n += 1
                del y
            assert n == 800


def square(x):
    return x * x


def pair_and_text(i, text):
    return i, text.upper()


def dict_every(i, n):
    return {"i": i} if i % n == 0 else i


def fails_at_537(i):
    if i == 537:
        raise CustomError(i, "537")
    return i


def text_of(n):
    return "r" * n


def ints_failing_after(n):
    yield from range(n)
    raise ZeroDivisionError("the input generator failed")


def long_atom(i, big_from, big, kind):
    """A short text before input ``big_from``, and from it on a long atom of about ``big``
    bytes pickled, of ``kind``: "str", "tuple" (of a str), "emoji" (a str of 4-byte
    characters), "np.str_" or "path"; or "mixed": 1 kB texts, and a dict every 100th."""
    if i < big_from:
        return "s"
    if kind == "mixed":
        return {"i": i} if i % 100 == 0 else "m" * 1000
    return {
        "str": lambda: "b" * big,
        "tuple": lambda: ("b" * big,),
        "emoji": lambda: "\N{GRINNING FACE}" * (big // 4),
        "np.str_": lambda: np.str_("b" * (big // 4)),
        "path": lambda: pathlib.PurePosixPath("/x" * (big // 4)),
    }[kind]()


def made_once(i, where, big_from, big, pause_every=0, kind="str"):
    """``long_atom(i, big_from, big, kind)``; every ``pause_every``-th call first sleeps
    30 ms. A call from ``big_from`` on, or one that pauses, marks itself made (a second time
    raises FileExistsError), but for the dicts."""
    pause = pause_every and i % pause_every == pause_every - 1
    if pause:
        time.sleep(0.03)
    result = long_atom(i, big_from, big, kind)
    if (pause or i >= big_from) and type(result) is not dict:
        with open(os.path.join(where, str(i)), "x"):
            pass
    return result


def test_calls_of_atoms_go_as_blocks_and_each_still_stands_alone():
    from mk1 import _args

    # The format: a block of calls reads back as the same calls, and says it is a block.
    w, size = _args.block(("calls", 5, 2, [(1, "a"), (2.5, None)]), 1 << 20)
    number, pairs, block = _args.read_calls(w.array())
    assert (number, block, size) == (5, True, w.nbytes)
    assert pairs == [((1, "a"), {}), ((2.5, None), {})]
    assert _args.block(("calls", 5, 1, [("x" * 2000,)]), 1000)[0] is None
    assert _args.flat((1, "a", (2, b"b"))) and not _args.flat(((1, [2]),))
    with mk1.Pool(workers=2) as p:
        assert list(p.map(square, range(20_000))) == [i * i for i in range(20_000)]
        assert sorted(p.imap_unordered(square, range(5000))) == [i * i for i in range(5000)]
        got = list(p.starmap(pair_and_text, ((i, f"t{i}") for i in range(3000))))
        assert got == [(i, f"T{i}") for i in range(3000)]
        # Items that are tuples of atoms, results that are not atoms now and then.
        got = list(p.map(dict_every, range(3000), [100] * 3000))
        assert got == [{"i": i} if i % 100 == 0 else i for i in range(3000)]
        # One argument per call, of every kind in turn: a block takes the items themselves
        # until one is not an atom (a tuple of atoms is one), then each goes on its own.
        items = [*range(500), (1, "a"), *range(500), ((1, (2,)),), [5], {"k": 6}, *range(500)]
        assert list(p.map(repr, items)) == [repr(x) for x in items]
        # numpy's scalars and paths are atoms too; results keep their types.
        xs = np.arange(300.0)
        got = list(p.map(np.sqrt, xs))
        assert got == list(np.sqrt(xs)) and type(got[7]) is np.float64
        assert all(type(x) in _args.ATOMS for x in (xs[0], np.int32(1), pathlib.Path("a")))
        paths = [pathlib.Path(f"/data/{i}.npy") for i in range(300)]
        assert list(p.map(str, paths)) == [f"/data/{i}.npy" for i in range(300)]
        # A call that fails in a block fails alone, in its turn.
        got = _taken_until(p.map(fails_at_537, range(2000)), CustomError, match="537")
        assert got == list(range(537))
        # The input fails midway: the calls before it come back first.
        got = _taken_until(
            p.map(square, ints_failing_after(2500)),
            ZeroDivisionError,
            match="input generator",
        )
        assert got == [i * i for i in range(2500)]


def test_blocks_too_large_for_a_slot_are_split_both_ways():
    with mk1.Pool(workers=2, max_array_bytes=1 << 20) as p:
        # Quick small calls size the batches large, then calls of 300 kB come: a block
        # that would not fit is halved until it does.
        texts = ["x"] * 3000 + [f"{i}" + "y" * 300_000 for i in range(12)] + ["z"] * 100
        assert list(p.map(len, texts)) == [len(t) for t in texts]
        # Results that do not fit together: as many as fit, the rest again on their own.
        sizes = [1] * 3000 + [200_000] * 40
        assert [len(r) for r in p.map(text_of, sizes)] == sizes


def test_a_block_of_results_stops_before_it_overflows_and_no_call_runs_twice(tmp_path):
    # Quick calls with tiny results size the batches large (blocks of hundreds), then every
    # result is an atom of 20 kB: a whole batch of those would not fit the slot. The worker
    # measures its results as they grow and stops the batch in time; the calls it did not make
    # run later. A call made twice fails (its marker file exists): before, the batch made
    # every call, found its block too large, and sent back only what fitted, and the rest ran
    # again. Every kind of long atom, and 1 kB texts with a dict now and then (the batch goes
    # on piece by piece from the dict, unless the texts before it would no longer fit as
    # pieces). Then the same with calls that stop their batch by running long.
    n, big_from, big = 1500, 700, 20_000
    with mk1.Pool(workers=2, max_array_bytes=1 << 16) as p:
        for kind in ("str", "tuple", "emoji", "np.str_", "path", "mixed"):
            where = tmp_path / kind
            where.mkdir()
            calls = ((i, str(where), big_from, big, 0, kind) for i in range(n))
            got = list(p.starmap(made_once, calls))
            assert got == [long_atom(i, big_from, big, kind) for i in range(n)], kind
            dicts = sum(type(r) is dict for r in got)
            assert len(os.listdir(where)) == n - big_from - dicts, kind
        where = str(tmp_path / "slow")
        os.mkdir(where)
        calls = ((i, where, n, 0, 40) for i in range(400))
        assert list(p.starmap(made_once, calls)) == ["s"] * 400
        assert len(os.listdir(where)) == 10


def test_a_garbled_block_is_an_error_never_a_crash():
    from mk1 import _args

    good, _ = _args.block(("calls", 3, 3, [(1,), ("s", 2.0), (None,)]), 1 << 20)
    good = good.array()
    _read_garbled_calls(good, seed=11)
    for bad in (("calls", 1, 2, [(1,)]), ("calls", 1, 1, [1]), ("calls", 1, 1, (1,))):
        w, _ = _args.block(bad, 1 << 20)
        with pytest.raises(ValueError, match="not calls"):
            _args.read_calls(w.array())
    for bad in (("results", 1, 0.0, 2, [1]), ("results", 1, 0.0, 1, (1,))):
        w, _ = _args.block(bad, 1 << 20)
        with pytest.raises(ValueError, match="not results"):
            _args.read_results(w.array())


class _KeepsAView:
    """A bundle writer that keeps a view of the slot it was given (mk1's own never do)."""

    nbytes = 100

    def write(self, dst):
        self.kept = memoryview(dst)
        self.kept[:4] = b"junk"


class _RaisesInWrite:
    nbytes = 100

    def write(self, dst):
        with memoryview(dst) as mv:
            mv[:4] = b"half"
        raise OSError("the bundle could not be written")


def test_bundles_are_written_into_their_slots_and_a_view_kept_is_refused():
    from mk1 import _args

    with mk1.Pool(workers=1, slots=2) as p:
        task = p._task(echo, _args.Batch)
        # A write that fails gives its slot back, every time.
        for _ in range(10):
            fut = mk1.Future(p, True)
            with pytest.raises(OSError, match="could not be written"):
                p._submit_one(_RaisesInWrite(), task, fut)
        # A view kept past the write: that submit fails, the slot stays out of use (it
        # could be written through the view), the view cannot take the buffer again, and
        # the pool goes on with its other slot.
        w = _KeepsAView()
        with pytest.raises(mk1.Mk1Error, match="outlived"):
            p._submit_one(w, task, mk1.Future(p, True))
        with pytest.raises(BufferError):
            memoryview(w.kept.obj)
        assert list(p.starmap(echo, [(i, "x") for i in range(50)])) == [
            ((i, "x"), {}) for i in range(50)
        ]
        assert p.submit(weighted_sum, np.ones(3), np.ones(3), weight=2).result().tolist() == [3.0] * 3


def test_workers_run_the_callers_own_mk1_with_the_callers_path(tmp_path):
    # A copy of this mk1, put on sys.path by the script itself, after the standard library
    # and before the site-packages where another mk1 may be installed; beside it, a module
    # named as one of the standard library's. The workers must run that copy of mk1 (not
    # what their default path finds first under the name), and resolve the rest as the
    # caller does (the standard library's `secrets`, not that directory's).
    import shutil

    alt = tmp_path / "alt"
    shutil.copytree(os.path.dirname(mk1.__file__), alt / "mk1")
    (alt / "secrets.py").write_text("raise ImportError('not the standard library')\n")
    r = run_script(
        tmp_path,
        f"""
        import sys
        at = next(k for k, p in enumerate(sys.path) if p.endswith("-packages"))
        sys.path.insert(at, {str(alt)!r})
        import mk1

        def mk1_file(_):
            import secrets
            return mk1.__file__, secrets.__file__

        if __name__ == "__main__":
            with mk1.Pool(workers=1) as pool:
                print("worker", *pool.submit(mk1_file, 0).result())
            print("caller", *mk1_file(0))
        """,
        env={"PYTHONPATH": ""},
    )
    assert r.returncode == 0, r.stderr
    worker, caller = r.stdout.splitlines()[-2:]
    assert caller.startswith(f"caller {alt}") and worker.startswith(f"worker {alt}"), r.stdout
    assert worker.split()[2] == caller.split()[2] != str(alt / "secrets.py"), r.stdout


def add(a, b):
    return a + b


def big_after(i, n):
    return [b"x" * 100_000] if i >= n else i


def test_maps_of_calls_take_what_the_builtin_map_takes_and_big_results_after_small_ones():
    with mk1.Pool(workers=2, max_array_bytes=64 << 10) as p:
        # The shorter input ends the map; the longer one loses one item, as with map().
        a = iter(range(10))
        assert list(p.map(add, a, [0, 0, 0])) == [0, 1, 2]
        assert list(a) == list(range(4, 10))
        # Quick calls returning small results size the batches large; then each result
        # takes most of a slot (fits alone): they run again on their own, none fails.
        got = list(p.map(big_after, range(22000), [20000] * 22000))
        assert got[:20000] == list(range(20000))
        assert all(r == [b"x" * 100_000] for r in got[20000:]) and len(got) == 22000


def _futures_threads() -> int:
    return sum(t.name == "mk1-futures" for t in threading.enumerate())


def test_futures_complete_by_themselves_for_the_standard_library_and_asyncio():
    import asyncio

    with mk1.Pool(workers=2) as p:
        fs = [p.submit(square, i) for i in range(50)]
        done, not_done = concurrent.futures.wait(fs, timeout=60)
        assert not not_done and sorted(f.result() for f in done) == [i * i for i in range(50)]
        fs = [p.submit(square, i) for i in range(50)]
        got = sorted(f.result() for f in concurrent.futures.as_completed(fs, timeout=60))
        assert got == [i * i for i in range(50)]
        # A callback fires without anyone waiting, in the pool's thread; it may submit.
        fired = threading.Event()
        then: list = []

        def callback(f):
            then.append(p.submit(square, f.result()))
            fired.set()

        p.submit(square, 3).add_done_callback(callback)
        assert fired.wait(60) and then[0].result(timeout=60) == 81

        async def main():
            return await asyncio.gather(
                *(asyncio.wrap_future(p.submit(square, i)) for i in range(20))
            )

        assert asyncio.run(main()) == [i * i for i in range(20)]
        # Idle, the pool's thread goes (it lingers a second).
        deadline = time.monotonic() + 10
        while p._driver.thread is not None:
            assert time.monotonic() < deadline, "the futures thread stayed"
            time.sleep(0.1)
        assert p.submit(square, 5).result(timeout=60) == 25


def test_a_pool_dropped_without_close_leaves_no_futures_thread():
    import gc

    p = mk1.Pool(workers=1)
    fs = [p.submit(square, i) for i in range(20)]
    assert len(concurrent.futures.wait(fs, timeout=60).done) == 20
    fs = [p.submit(sleeps_then, 0.2, i) for i in range(3)]  # (still pending when dropped)
    assert _futures_threads() >= 1
    del p, fs
    gc.collect()
    deadline = time.monotonic() + 10
    while _futures_threads():
        assert time.monotonic() < deadline, "a futures thread outlived its pool"
        time.sleep(0.1)


def test_a_slow_input_is_not_held_back_to_fill_a_batch():
    taken = 0

    def inputs():
        nonlocal taken
        for i in range(3400):
            if i >= 3000:
                time.sleep(0.002)  # (then the input slows down)
            taken = i + 1
            yield i

    with mk1.Pool(workers=2) as p:
        for i, r in enumerate(p.map(square, inputs())):
            assert r == i * i
            if i == 3000:
                # Quick calls sized the batches large; a slow input sends what it gave.
                assert taken < 3200, taken


def slow_every(i, n):
    if i % n == n - 1:
        time.sleep(0.03)
    return i


def slow_then_dies(i, slow, dies):
    if i == slow:
        time.sleep(0.03)
    if i == dies:
        os._exit(5)
    return i


def test_calls_a_long_batch_left_run_again_in_groups_and_each_fails_alone():
    with mk1.Pool(workers=2) as p:
        # A slow call now and then makes its batch stop: the calls it left run again in
        # groups, in their turn.
        assert list(p.map(slow_every, range(6000), [700] * 6000)) == list(range(6000))
        assert sorted(p.imap_unordered(slow_every, range(3000), [700] * 3000)) == list(
            range(3000)
        )
        # A call that kills its worker in such a group fails alone, in its turn.
        got = _taken_until(
            p.map(slow_then_dies, range(4000), [2500] * 4000, [2510] * 4000),
            mk1.WorkerDied,
        )
        assert got == list(range(2510))
        assert p.submit(square, 4).result() == 16


def slow_items(n, seconds, taken):
    for i in range(n):
        time.sleep(seconds)
        taken.append(i)
        yield i


def test_a_map_hands_out_results_at_the_pace_of_a_slow_input():
    # (The window is 32 slots: results used to wait until 32 inputs were taken. A result
    # normally comes back 1-2 inputs after its own; the bound leaves room for a busy host: with
    # two busy loops on this 2-CPU machine, one run saw 7.)
    with mk1.Pool(workers=2, slots=32) as p:
        # (Both workers have run a call, so that neither starts during the map.)
        assert [f.result() for f in [p.submit(nap, 0.2) for _ in range(2)]] == [0.2] * 2
        for make in (lambda i: i, lambda i: np.full(4, float(i))):
            taken: list = []
            seen = []
            for k, r in enumerate(p.map(square, (make(i) for i in slow_items(40, 0.03, taken)))):
                seen.append(len(taken) - k)
            assert max(seen) <= 16, seen


def test_a_map_waiting_on_its_input_holds_up_no_other_thread():
    import queue

    with mk1.Pool(workers=2) as p:
        q: queue.Queue = queue.Queue()
        q.put(1)
        errors = []

        def consume():
            try:
                list(p.map(square, iter(q.get, None)))  # (waits on the queue after one item)
            except ValueError as e:
                errors.append(e)

        t = threading.Thread(target=consume)
        t.start()
        time.sleep(0.3)
        started = time.monotonic()
        assert p.submit(square, 7).result(timeout=60) == 49
        assert time.monotonic() - started < 5, "submit waited for the map's input"
        p.terminate()  # (from this thread, while the map waits on its input)
        q.put(2)
        t.join(60)
        assert not t.is_alive() and errors, "the map ends with the pool"


class CarriesData(ValueError):
    def __init__(self, msg, data=None):
        super().__init__(msg)
        self.data = data


def raises_large(i):
    """Fails at 3 with an exception carrying 8 MB (more than a slot), at 5 with a message of
    10 MB; else returns ``i`` (an array's first element, for an array)."""
    if isinstance(i, np.ndarray):
        i = int(i[0])
    if i == 3:
        raise CarriesData("row 3 is invalid", data=np.zeros(1_000_000))
    if i == 5:
        raise ValueError("start" + "x" * 10_000_000 + "end")
    return i


def test_an_exception_too_large_for_a_slot_comes_back_as_its_traceback():
    """As on the path of one array: an exception with data of its own cannot come back, its
    traceback does (cut in the middle when even that does not fit); one made of its message
    alone comes back as its type, the message cut in the middle; and the calls beside them
    are not affected."""
    with mk1.Pool(workers=1, max_array_bytes=1 << 20) as p:
        e = p.submit(raises_large, 3).exception(60)
        assert isinstance(e, mk1.RemoteError), e
        assert "CarriesData: row 3 is invalid" in str(e) and "raise CarriesData" in str(e)
        # (As a call, and as a function of one array.)
        for arg in (5, np.array([5])):
            e = p.submit(raises_large, arg).exception(60)
            assert type(e) is ValueError and "characters cut to fit the slot" in str(e), e
            assert str(e).startswith("startxx") and str(e).endswith("xxend")
            assert len(str(e)) < 1 << 20
            assert "cut to fit the slot" in str(e.__cause__), e.__cause__
        it = p.imap(raises_large, range(8))
        got = []
        for _ in range(8):
            try:
                got.append(next(it))
            except (mk1.RemoteError, ValueError) as e:
                got.append(type(e).__name__ + (" 3" if "row 3" in str(e) else " 5"))
        assert got == [0, 1, 2, "RemoteError 3", 4, "ValueError 5", 6, 7]


def test_async_results_are_ready_only_once_their_callbacks_returned():
    """As multiprocessing's: ``get``, ``wait`` and ``ready`` see a result only after its
    callback (or error callback) is done with it, so a callback may collect what ``get``'s
    caller then reads."""
    with mk1.Pool(workers=2) as p:
        # The result comes while nobody waits: the pool's own thread receives it and runs the
        # callback, which is still running when the caller looks.
        done = []
        r = p.apply_async(
            sleeps_then, (0.2, "v"), callback=lambda v: (time.sleep(0.5), done.append(v))
        )
        time.sleep(0.35)
        assert not r.ready() or done == ["v"]
        assert r.get(60) == "v" and done == ["v"] and r.ready()
        # Called and waited for at once, over and over.
        for k in range(20):
            out = []
            m = p.map_async(
                square, range(k + 1), callback=lambda v: (time.sleep(0.005), out.extend(v))
            )
            assert m.get(60) == [i * i for i in range(k + 1)] == out
        errors = []
        b = p.apply_async(
            fails_at_537, (537,), error_callback=lambda e: (time.sleep(0.2), errors.append(e))
        )
        b.wait(60)
        assert b.ready() and not b.successful() and isinstance(errors[0], CustomError)
        # A callback that raises: the result is still there, and still the task's.
        c = p.apply_async(square, (3,), callback=lambda v: 1 / 0)
        assert c.get(60) == 9 and c.successful()


def test_the_spellings_of_multiprocessing_and_concurrent_futures():
    import multiprocessing

    with mk1.Pool(workers=2) as p:
        # multiprocessing.Pool's: apply takes a tuple and a dict, *_async give AsyncResults,
        # chunksize comes as a keyword or a last positional int.
        assert p.apply(square, (3,)) == 9
        assert p.apply(weighted_sum, (np.ones(2), np.ones(2)), {"weight": 2}).tolist() == [3, 3]
        r = p.apply_async(square, (4,))
        assert r.get(timeout=60) == 16 and r.ready() and r.successful()
        got, errors = [], []
        a = p.apply_async(square, (5,), callback=got.append)
        b = p.apply_async(fails_at_537, (537,), error_callback=errors.append)
        a.wait(60)
        b.wait(60)
        assert not b.successful()
        deadline = time.monotonic() + 60
        while not (got and errors):
            assert time.monotonic() < deadline, "the callbacks never ran"
            time.sleep(0.01)
        assert got == [25] and isinstance(errors[0], CustomError)
        slow = p.apply_async(sleeps_then, (1.0, "late"))
        with pytest.raises(ValueError, match="not ready"):
            slow.successful()
        with pytest.raises(multiprocessing.TimeoutError):
            slow.get(timeout=0.05)
        assert slow.get(timeout=60) == "late"
        squares = [i * i for i in range(300)]
        assert p.map_async(square, range(300), callback=got.append).get(60) == squares
        assert p.starmap_async(add, [(1, 2), (3, 4)]).get(60) == [3, 7]
        assert list(p.map(square, range(300), 7)) == squares
        assert list(p.imap(square, range(300), chunksize=1)) == squares
        assert sorted(p.imap_unordered(square, range(300), 16)) == squares
        assert list(p.starmap(add, [(1, 2)] * 10, 3)) == [3] * 10
        with pytest.raises(TypeError, match="twice"):
            p.map(square, range(3), 4, chunksize=5)
        with pytest.raises(ValueError, match="at least 1"):
            p.map(square, range(3), chunksize=0)
    # concurrent.futures' shutdown: waits, or not, for what was submitted.
    p = mk1.Pool(workers=1)
    f = p.submit(sleeps_then, 0.2, "done")
    p.shutdown()
    assert f.result() == "done"
    p = mk1.Pool(workers=1)
    f = p.submit(sleeps_then, 0.2, "later")
    p.shutdown(wait=False)
    assert f.result(timeout=60) == "later"
    deadline = time.monotonic() + 60
    while p._core is not None:
        assert time.monotonic() < deadline, "shutdown(wait=False) never closed the pool"
        time.sleep(0.01)
    # The workers' count under both families' names; join() as multiprocessing's: only after
    # close() or terminate() (or shutdown), and then it waits for the closing.
    for name in ("processes", "max_workers"):
        with mk1.Pool(**{name: 1}) as p:
            assert p.workers == 1 and p.submit(square, 3).result() == 9
    with pytest.raises(TypeError, match="one setting"):
        mk1.Pool(workers=1, processes=2)
    p = mk1.Pool(workers=1)
    with pytest.raises(ValueError, match="still running"):
        p.join()
    f = p.submit(sleeps_then, 0.3, "joined")
    p.shutdown(wait=False)
    p.join()
    assert p._core is None and f.done() and f.result() == "joined"
    sizer = mk1._pool._BatchSizer(True, 1 << 20, cap=3)
    sizer.record(0.0001, 100)
    assert sizer.size == 3, "chunksize caps the batches"


def test_shutdown_without_waiting_still_runs_what_was_submitted_when_the_program_ends(tmp_path):
    # As ProcessPoolExecutor: shutdown(wait=False) returns at once, and a script that ends
    # right after it still gets its tasks run to their end (they were killed at exit before),
    # then its workers stopped and its shared memory removed.
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    r = run_script(
        tmp_path,
        """
        import time, mk1

        def slow_write(name, seconds):
            time.sleep(seconds)
            with open(name, "w") as f:
                f.write("done")
            return name

        if __name__ == "__main__":
            pool = mk1.Pool(workers=2)
            with open("pids", "w") as f:
                f.write(" ".join(map(str, pool.worker_pids())))
            futs = [pool.submit(slow_write, f"out{i}", 0.4) for i in range(4)]
            pool.shutdown(wait=False)
            print("returned with", sum(f.done() for f in futs), "done", flush=True)
        """,
    )
    assert r.returncode == 0, r.stderr
    assert "returned with 0 done" in r.stdout
    assert all((tmp_path / f"out{i}").read_text() == "done" for i in range(4))
    for pid in (int(p) for p in (tmp_path / "pids").read_text().split()):
        assert _gone_soon(pid), pid
    if os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) - shm_before == set()


def test_futures_fail_cleanly_when_another_thread_terminates_the_pool_meanwhile():
    # A thread waits on one future while another terminates the pool. The other futures are
    # failed by the terminating thread once the workers are gone; until then, done() says
    # False and result()/exception() wait for it. Before, they raised "the pool is closed"
    # (a ValueError, from done() too) in that window.
    for _ in range(3):
        p = mk1.Pool(workers=2)
        fs = [p.submit(sleeps_then, 5, i) for i in range(4)]
        threading.Timer(0.1, p.terminate).start()
        with pytest.raises((mk1.NoWorkersLeft, mk1.Mk1Error)):
            fs[0].result(timeout=30)
        for f in fs[1:]:
            assert f.done() in (False, True)
            e = f.exception(timeout=30)
            assert isinstance(e, mk1.Mk1Error) and "terminated" in str(e), e
            assert f.done()


def test_a_callback_may_wait_on_another_future_while_the_pool_is_terminated():
    # The terminating thread fails the pending futures one by one, running their callbacks:
    # a callback waiting on a future not yet failed fails that one itself (it waited until
    # the end of the closing before: forever, without a timeout).
    p = mk1.Pool(workers=1)
    a, b = p.submit(sleeps_then, 30, "a"), p.submit(sleeps_then, 30, "b")
    seen = []
    a.add_done_callback(lambda f: seen.append(b.exception(timeout=20)))
    b.add_done_callback(lambda f: seen.append(a.exception(timeout=20)))
    t = time.monotonic()
    p.terminate()
    assert time.monotonic() - t < 10
    assert len(seen) == 2 and all(isinstance(e, mk1.Mk1Error) for e in seen), seen


def test_a_forked_child_does_not_wait_for_its_parents_pool():
    # In a child made by fork(), the pool is closed: a pending future it inherited fails, and
    # close() then join() return (they waited forever for a closing that never comes there).
    p = mk1.Pool(workers=1)
    try:
        fut = p.submit(sleeps_then, 1, "parent's")
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                e = fut.exception(timeout=10)
                try:
                    p.submit(sleeps_then, 0, "child's")
                    said = ""
                except ValueError as v:
                    said = str(v)
                p.close()
                p.join()
                code = 0 if isinstance(e, mk1.Mk1Error) and "forked" in said else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError("the child hung on its parent's pool")
            time.sleep(0.02)
        assert os.waitstatus_to_exitcode(status) == 0
        assert fut.result(timeout=30) == "parent's"
    finally:
        p.close()


def test_a_slow_callback_holds_up_no_other_threads_use_of_the_pool():
    with mk1.Pool(workers=2) as p:
        # (Both workers have run a call: the timed one does not include a worker's start.)
        assert [f.result() for f in [p.submit(nap, 0.2) for _ in range(2)]] == [0.2] * 2
        started = threading.Event()

        def slow(f):
            started.set()
            time.sleep(5)

        p.submit(square, 2).add_done_callback(slow)
        assert started.wait(60)
        t = time.monotonic()
        assert p.submit(square, 3).result(timeout=60) == 9
        assert time.monotonic() - t < 3.0, "a submit waited for another thread's callback"


def test_map_async_survives_close_and_join_and_a_callback_may_feed_a_maps_input():
    import queue

    p = mk1.Pool(workers=2)
    r = p.map_async(nap, [0.01] * 100, chunksize=1)
    s = p.starmap_async(add, [(i, 1) for i in range(50)])
    time.sleep(0.05)
    p.close()  # (as multiprocessing: close, join, then get)
    p.join()
    assert r.get(timeout=60) == [0.01] * 100 and s.get(timeout=60) == list(range(1, 51))
    with mk1.Pool(workers=2) as p:
        # A future's callback feeds the input of a map running in this thread.
        q: queue.Queue = queue.Queue()
        for i in range(5):
            p.submit(sleeps_then, 0.02 * (i + 1), i).add_done_callback(q.put)
        fed = (q.get(timeout=30).result() for _ in range(5))
        assert sorted(p.map(sleeps_then, [0.3] * 5, fed)) == list(range(5))
        # result(0) and get(0) see a result that has come.
        f = p.submit(square, 6)
        deadline = time.monotonic() + 60
        while True:
            try:
                assert f.result(0) == 36
                break
            except concurrent.futures.TimeoutError:
                assert time.monotonic() < deadline
                time.sleep(0.01)


def test_ctrl_c_while_a_thread_receives_loses_no_future(tmp_path):
    r = run_script(
        tmp_path,
        """
        import os, signal, threading, time, concurrent.futures as cf
        import mk1

        def slow(i):
            time.sleep(0.1)
            return i

        if __name__ == "__main__":
            lost = 0
            with mk1.Pool(workers=2) as p:
                for round in range(8):
                    fs = [p.submit(slow, i) for i in range(10)]
                    kill = (os.getpid(), signal.SIGINT)
                    timer = threading.Timer(0.05 + 0.01 * round, os.kill, kill)
                    timer.start()
                    try:
                        fs[-1].result()
                        timer.join()  # (the interrupt comes here if the result came first)
                    except KeyboardInterrupt:
                        pass
                    timer.join()
                    done, not_done = cf.wait(fs, timeout=30)
                    lost += len(not_done)
                    assert all(f.result() == i for i, f in enumerate(fs) if f.exception() is None)
            print("lost", lost)
        """,
    )
    assert r.returncode == 0, r.stderr
    assert "lost 0" in r.stdout, r.stdout


def test_ctrl_c_in_a_map_loses_nothing_and_the_map_goes_on(tmp_path):
    """Ctrl-C (KeyboardInterrupt) raised by a map's ``next``, caught, and the same iterator
    taken up again: every result still comes, once, in order for ``imap`` and ``map`` (as
    ``multiprocessing``'s ``imap``), for calls, arrays and zero-copy arrays. (The iterator once
    ended early instead, dropping the rest; and a result on its way out as the interrupt came
    was lost.)"""
    r = run_script(
        tmp_path,
        """
        import os, random, signal, threading, time
        import numpy as np
        import mk1

        def slow(x):
            time.sleep(0.01)
            return x * 2

        if __name__ == "__main__":
            random.seed(7)
            bad = kis = 0
            with mk1.Pool(workers=2) as p:
                for kind in ("imap", "imap_unordered", "map"):
                    for arrays, zc in ((False, False), (True, False), (True, True)):
                        n = 120
                        items = (
                            [np.full(4, i, dtype=np.int64) for i in range(n)]
                            if arrays
                            else list(range(n))
                        )
                        kw = {"zero_copy": True} if zc else {}
                        it = getattr(p, kind)(slow, items, **kw)
                        got = []
                        stop = threading.Event()

                        def fire():
                            for _ in range(4):
                                if stop.wait(random.uniform(0.01, 0.12)):
                                    return
                                os.kill(os.getpid(), signal.SIGINT)

                        t = threading.Thread(target=fire)
                        t.start()
                        while True:
                            try:
                                r = next(it)
                                got.append(int(r[0]) if arrays else r)
                            except KeyboardInterrupt:
                                kis += 1
                            except StopIteration:
                                break
                        stop.set()
                        t.join()
                        while True:  # (an interrupt fired as the map ended)
                            try:
                                time.sleep(0.05)
                                break
                            except KeyboardInterrupt:
                                kis += 1
                        want = [2 * i for i in range(n)]
                        if sorted(got) != want or (kind != "imap_unordered" and got != want):
                            bad += 1
                            print("BAD", kind, arrays, zc, len(got))
            print("bad", bad, "interrupts", kis)
        """,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    assert "bad 0 " in r.stdout, r.stdout
    # Every interrupt reached the caller (4 per map, 9 maps), none swallowed.
    assert "interrupts 36" in r.stdout, r.stdout


def test_a_map_never_iterated_warns_that_nothing_ran(pool, tmp_path):
    """``Pool.map`` is lazy, unlike ``multiprocessing.Pool.map``: one dropped unused ran
    nothing, and says so. One iterated, or closed, says nothing."""
    marker = tmp_path / "ran"
    with pytest.warns(RuntimeWarning, match="never iterated, so none of its calls ran"):
        pool.map(touch_file, [str(marker)])
        gc.collect()
    assert not marker.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(pool.map(touch_file, [str(marker)])) == [None]
        pool.imap(touch_file, [str(marker)]).close()
        gc.collect()
    assert marker.exists()


def touch_file(path):
    open(path, "w").close()


def test_a_map_read_after_its_pool_closed_says_maps_are_lazy():
    """A map made inside ``with pool:`` and read after it (as one reads the list
    ``multiprocessing.Pool.map`` returns) raises, every time it is read, saying why."""
    with mk1.Pool(workers=1) as p:
        untouched = p.map(x3p1, [np.ones(3)] * 4)
        begun = p.imap_unordered(x3p1, [np.ones(3)] * 1000)
        next(begun)
    for m in (untouched, begun, untouched):
        with pytest.raises(ValueError, match="the pool is closed: .* are lazy.* inside the `with`"):
            list(m)


def exits_once_then_naps(i, marker):
    """Kills its worker the first time call 150 runs; run again, call 150 takes 1 s."""
    if i == 150:
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(3)
        time.sleep(1.0)
    return i * 2


def _taken_with_timeouts(it, timeout):
    """Every result of the map ``it``, each taken with ``it.next(timeout)`` (again after a
    ``multiprocessing.TimeoutError``), and how many of those calls raised it."""
    got, passed = [], 0
    while True:
        try:
            got.append(it.next(timeout=timeout))
        except multiprocessing.TimeoutError:
            passed += 1
        except StopIteration:
            return got, passed


def test_next_with_a_timeout_raises_and_the_map_goes_on_losing_nothing(tmp_path):
    """``imap(...).next(timeout)`` as ``multiprocessing``'s: ``multiprocessing.TimeoutError``
    when no result came within ``timeout``, and the map goes on; a result already back goes
    out even with ``timeout=0``."""
    with mk1.Pool(workers=2) as pool:
        cases = [
            # arrays, calls (batched), completion order
            (lambda: pool.imap(slow_sleep, [np.array([1.0])] + [np.array([0.01])] * 5),
             lambda got: [float(y[0]) for y in got] == [1.0] + [0.01] * 5),
            (lambda: pool.imap(slow_sleep, [np.array([1.0])] + [np.array([0.01])] * 5,
                               zero_copy=True),
             lambda got: [float(y[0]) for y in got] == [1.0] + [0.01] * 5),
            (lambda: pool.imap(nap, [1.0] + [0.01] * 5),
             lambda got: got == [1.0] + [0.01] * 5),
            (lambda: pool.imap_unordered(nap, [1.0, 1.0]),
             lambda got: got == [1.0, 1.0]),
        ]
        for make, right in cases:
            it = make()
            t0 = time.monotonic()
            with pytest.raises(multiprocessing.TimeoutError):
                it.next(timeout=0.1)
            assert time.monotonic() - t0 < 0.9, "the step waited for the slow call"
            got, passed = _taken_with_timeouts(it, 0.05)
            assert right(got), got
            assert passed >= 1
        assert isinstance(it, mk1.MapIterator) and iter(it) is it
        # A result already back goes out with timeout=0.
        it = pool.imap(nap, [0.01])
        with pytest.raises(multiprocessing.TimeoutError):
            it.next(timeout=0)  # (the map starts here: nothing can be back yet)
        time.sleep(0.5)
        assert it.next(timeout=0) == 0.01
        with pytest.raises(StopIteration):
            it.next(timeout=0)
        # The map's own timeout still ends the map.
        it = pool.imap(nap, [3.0, 0.01], timeout=0.5)
        with pytest.raises(multiprocessing.TimeoutError):
            it.next(timeout=0.1)
        with pytest.raises(concurrent.futures.TimeoutError):
            it.next(timeout=30)
        with pytest.raises(StopIteration):
            next(it)
        # Calls a batch's worker left, run again on their own (its worker died), are waited for
        # step by step too.
        marker = str(tmp_path / "died")
        it = pool.map(exits_once_then_naps, range(400), [marker] * 400)
        got, passed = _taken_with_timeouts(it, 0.05)
        assert got == [2 * i for i in range(400)]
        assert os.path.exists(marker) and passed >= 1
        # And calls left by a batch that ran long (run again in groups; here one takes 300 ms),
        # also with timeout=0 (a result that came as the wait ended once ended the map).
        for n, step in ((3000, 0.05), (200, 0)):
            it = pool.map(slow_then_naps, range(n), [40 if step == 0 else 700] * n)
            got, passed = _taken_with_timeouts(it, step)
            assert got == list(range(n)) and passed >= 1
        # One thread at a time, as with a generator: another thread's next meanwhile is
        # refused, and takes nothing from the map.
        it = pool.imap(nap, [2.5, 0.01])
        refused = []

        def other():
            deadline = time.monotonic() + 30
            while not it._turn.locked() and time.monotonic() < deadline:
                time.sleep(0.001)
            try:
                refused.append(next(it))
            except ValueError as e:
                refused.append(str(e))

        th = threading.Thread(target=other)
        th.start()
        with pytest.raises(multiprocessing.TimeoutError):
            it.next(timeout=2.0)
        th.join(30)
        assert refused == ["a map's iterator is being iterated in another thread"]
        assert list(it) == [2.5, 0.01]
        # close() ends a map early; the pool goes on.
        it = pool.imap(nap, [0.01] * 10)
        assert it.next(timeout=30) == 0.01
        it.close()
        with pytest.raises(StopIteration):
            next(it)
        assert pool.submit(nap, 0.01).result() == 0.01


def slow_then_naps(i, n):
    """Every ``n``th call takes 30 ms (its batch stops after it), the call after it 300 ms."""
    if i % n == n - 1:
        time.sleep(0.03)
    if i % n == 0 and i > 0:
        time.sleep(0.3)
    return i


def pid_of(_):
    return os.getpid()


def pid_array(x):
    return np.full(1, os.getpid(), np.int64)


def test_max_tasks_per_child_replaces_each_worker_after_that_many_calls():
    """As ``multiprocessing.Pool(maxtasksperchild=)`` and ``ProcessPoolExecutor(
    max_tasks_per_child=)``: a worker process makes at most that many calls (a batch of quick
    calls stops at the limit, and the calls it left run again), then a fresh one replaces it;
    nothing is lost, and replacements for it are not charged to ``max_restarts``."""
    import collections

    with mk1.Pool(workers=2, maxtasksperchild=5, max_restarts=0) as pool:
        for make in (
            lambda: pool.map(pid_of, range(40)),  # calls, in batches
            lambda: (int(a[0]) for a in pool.map(pid_array, [np.ones(2)] * 30)),  # arrays
            lambda: (f.result() for f in [pool.submit(pid_of, i) for i in range(12)]),
        ):
            pids = collections.Counter(make())
            assert max(pids.values()) <= 5, pids
            assert sum(pids.values()) in (40, 30, 12)
            assert len(pids) >= sum(pids.values()) // 5
        assert restarts_reaching(pool, 14) >= 14  # (82 calls, 5 a process, 2 left running)
        assert pool.submit(square, 3).result() == 9
    # The spellings, and what is refused.
    with mk1.Pool(1, None, (), 2) as pool:  # (multiprocessing's fourth positional argument)
        assert len(set(pool.map(pid_of, range(6)))) == 3
    with mk1.Pool(workers=1, max_tasks_per_child=1) as pool:
        assert len({pool.submit(pid_of, i).result() for i in range(3)}) == 3
    with pytest.raises(TypeError, match="one setting"):
        mk1.Pool(workers=1, maxtasksperchild=2, max_tasks_per_child=2)
    with pytest.raises(ValueError, match="max_tasks_per_child must be at least 1"):
        mk1.Pool(workers=1, max_tasks_per_child=0)
    with pytest.raises(ValueError, match="maxtasksperchild must be at least 1"):
        mk1.Pool(workers=1, maxtasksperchild=-1)
    with pytest.raises(TypeError, match="maxtasksperchild must be an int"):
        mk1.Pool(workers=1, maxtasksperchild=2.5)


def test_a_multiprocessing_context_is_taken_where_its_workers_start_as_mk1s():
    """``context``/``mp_context``: mk1's workers start as fresh interpreters, as "spawn"
    starts them; "spawn" and "forkserver" are taken, "fork" is refused with the reason."""
    spawn = multiprocessing.get_context("spawn")
    with mk1.Pool(1, None, (), None, spawn) as pool:  # (multiprocessing's fifth argument)
        assert pool.submit(square, 3).result() == 9
    with mk1.Pool(workers=1, mp_context="forkserver") as pool:
        assert pool.submit(square, 4).result() == 16
    with pytest.raises(ValueError, match="'fork' context is not supported"):
        mk1.Pool(workers=1, context=multiprocessing.get_context("fork"))
    with pytest.raises(TypeError, match="one setting"):
        mk1.Pool(workers=1, context=spawn, mp_context=spawn)
    with pytest.raises(TypeError, match="multiprocessing context"):
        mk1.Pool(workers=1, context=3)
    with pytest.raises(ValueError, match="cannot find context for 'Spawn'"):
        mk1.Pool(workers=1, context="Spawn")
    with pytest.raises(TypeError, match="pass the context as mp_context="):
        mk1.Pool(1, spawn)  # (ProcessPoolExecutor's order: max_workers, mp_context)


def _each_or_its_error(it) -> list:
    """Every item of ``it``, or the exception it raised there, taking the next after an
    exception, until ``StopIteration``."""
    got = []
    while True:
        try:
            got.append(next(it))
        except StopIteration:
            return got
        except Exception as e:  # noqa: BLE001 - what the test looks at
            got.append(e)


def test_imap_goes_on_after_a_failure_as_multiprocessing_does_and_map_ends_there():
    """``imap``/``imap_unordered`` raise a failed item's exception at its turn and go on (as
    ``multiprocessing``'s); ``map`` ends there (as ``concurrent.futures``')."""
    arrays = [np.full(2, float(i)) for i in range(12)]
    with mk1.Pool(workers=2) as pool:
        # Calls (batched), arrays (one to a slot, several to a batch of calls when packed).
        got = _each_or_its_error(pool.imap(fails_at_seven, range(12), [np.ones(2)] * 12))
        assert [type(g) for g in got].count(CustomError) == 1
        assert isinstance(got[7], CustomError)
        assert [g[0] for k, g in enumerate(got) if k != 7] == [i for i in range(12) if i != 7]
        got = _each_or_its_error(pool.imap(raises_on_seven, arrays))
        assert isinstance(got[7], CustomError) and len(got) == 12
        assert [float(g[0]) for k, g in enumerate(got) if k != 7] == [
            2.0 * i for i in range(12) if i != 7
        ]
        got = _each_or_its_error(pool.imap_unordered(raises_on_seven, arrays))
        assert len(got) == 12 and sum(isinstance(g, CustomError) for g in got) == 1
        # next(timeout) too.
        it = pool.imap(raises_on_seven, arrays)
        got = []
        for _ in range(12):
            try:
                got.append(float(it.next(timeout=30)[0]))
            except CustomError:
                got.append(None)
        assert got == [None if i == 7 else 2.0 * i for i in range(12)]
        # map ends at the failure.
        got = _each_or_its_error(pool.map(raises_on_seven, arrays))
        assert len(got) == 8 and isinstance(got[7], CustomError)
        # The input's own failure ends imap too, after what was taken before it.
        got = _each_or_its_error(pool.imap(x3p1, divide_by_zero_at(3)))
        assert len(got) == 4 and isinstance(got[3], ZeroDivisionError)


def raises_on_seven(x):
    if x[0] == 7:
        raise CustomError(7, "seven")
    return x * 2


def dies_on_five(x):
    if int(np.asarray(x).flat[0]) == 5:
        os._exit(3)
    return x


def test_every_input_of_a_map_comes_back_once_no_worker_is_left():
    # A call that kills the only worker of a pool that may not replace it: every input, calls
    # batched together included, still comes back in its turn, as a result or an error.
    for items, chunk in (
        (list(range(20)), None),
        (list(range(20)), 1),
        ([np.array([i]) for i in range(20)], None),
    ):
        with mk1.Pool(workers=1, max_restarts=0) as pool:
            it = pool.imap(dies_on_five, items, chunksize=chunk)
            got = []
            while True:
                try:
                    got.append(int(np.asarray(next(it)).flat[0]))
                except StopIteration:
                    break
                except mk1.Mk1Error as e:
                    got.append(type(e).__name__)
            assert len(got) == 20, got
            assert got[0] == 0 and got[5] in ("NoWorkersLeft", "WorkerDied"), got
            if isinstance(items[0], np.ndarray) or chunk == 1:
                # (An array, or a call sent alone, is its own task: the one that killed the
                # last worker says so.)
                assert got[5] == "WorkerDied", got
            # (Once no worker is left, nothing runs: every later input fails, each on its own.)
            first = next(i for i, x in enumerate(got) if isinstance(x, str))
            assert all(x in ("NoWorkersLeft", "WorkerDied") for x in got[first:]), got
            assert got[:first] == list(range(first)), got


def add2(x, y):
    return x + y


def first_plus_second(t):
    return t[0] + t[1]


def first_byte(t):
    return np.array([t[0][0]])


Pair = collections.namedtuple("Pair", "x y")


class Holder:
    """An object with an array inside (not a container mk1 looks into)."""

    def __init__(self, a):
        self.a = a


def held_first(h):
    return np.array([h.a[0]])


def deep_first(x):
    return np.array([x[0][0][0][0][0]])


def refilled(buf, n, pair=True):
    """One buffer, refilled with i before each item is yielded (a common generator)."""
    for i in range(n):
        buf[:] = bytes([i % 256]) * len(buf) if isinstance(buf, bytearray) else i
        yield (buf, 0) if pair else buf


def test_calls_keep_their_arguments_as_they_were_when_taken_from_the_input(pool):
    # A generator that refills one buffer: each call sees the values of its own turn, in
    # every kind of map that batches calls.
    n = 250
    for run in (
        lambda: pool.starmap(add2, refilled(np.zeros(64), n)),
        lambda: pool.map(add2, refilled(np.zeros(64), n, pair=False), [0] * n),
        lambda: pool.imap(first_plus_second, refilled(np.zeros(64), n)),
        lambda: pool.imap(first_plus_second, ([b, 0] for b, _ in refilled(np.zeros(64), n))),
        lambda: pool.imap(first_byte, refilled(bytearray(8), n)),
        # (However it is wrapped: a named tuple, an object, lists five deep.)
        lambda: pool.imap(first_plus_second, (Pair(b, 0) for b, _ in refilled(np.zeros(8), n))),
        lambda: pool.imap(held_first, (Holder(b) for b, _ in refilled(np.zeros(8), n))),
        lambda: pool.imap(deep_first, ([[[[b]]]] for b, _ in refilled(np.zeros(8), n))),
    ):
        got = list(run())
        wrong = [i for i, r in enumerate(got) if int(np.asarray(r).flat[0]) != i % 256]
        assert len(got) == n and not wrong, wrong[:10]


def logs_then_dies_at(i, n, log):
    if i == n:
        with open(log, "a") as f:
            f.write("x")
        os._exit(3)
    return i


@pytest.mark.parametrize("retries", [1, 2])
def test_a_call_that_kills_its_batch_s_worker_runs_at_most_1_plus_max_retries_times(retries):
    # Its run in the batch counts: it runs again on its own with the redos left (before, the
    # whole batch was redone max_retries times, then each of its calls max_retries more).
    with tempfile.TemporaryDirectory() as d, mk1.Pool(workers=2, max_retries=retries) as p:
        log = os.path.join(d, "runs")
        got, errors = [], []
        it = p.imap(logs_then_dies_at, range(1000), [400] * 1000, [log] * 1000)
        while True:
            try:
                got.append(next(it))
            except StopIteration:
                break
            except mk1.WorkerDied as e:
                errors.append(str(e))
        assert got == [i for i in range(1000) if i != 400]
        with open(log) as f:
            assert len(f.read()) == retries + 1
        assert len(errors) == 1 and f"after {retries + 1} attempt(s)" in errors[0], errors


def secret(x):
    return np.full(x.shape, 123456.0, x.dtype)


def writes_nothing(x, out):
    return None


def test_an_out_the_function_leaves_unwritten_is_zero_out_of_place_and_the_input_in_place():
    x = np.arange(4, dtype=np.float32)
    with mk1.Pool(workers=1, slots=1) as p:
        p.submit(secret, x).result()  # (the one slot's output holds 123456s now)
        assert p.submit(writes_nothing, x).result().tolist() == [0, 0, 0, 0]
        assert [r.tolist() for r in p.map(writes_nothing, [x, x])] == [[0] * 4] * 2
    with mk1.Pool(workers=1, slots=1, mode="in-place") as p:
        p.submit(secret, x).result()
        assert p.submit(writes_nothing, x).result().tolist() == x.tolist()


def slow_calls_with_arrays(n):
    for i in range(n):
        time.sleep(0.01)  # (longer than a batch waits for its input)
        yield np.full(3, float(i)), 1


def test_a_slow_input_of_calls_with_arrays_comes_back_right():
    # The first call was set aside while the input's slowness closed its batch, empty: that
    # batch took a number all the same, and every result after it was refused as another
    # batch's ("a worker sent back the results of another batch").
    with mk1.Pool(workers=1) as p:
        got = [float(r[0]) for r in p.starmap(add2, slow_calls_with_arrays(5))]
        assert got == [1.0, 2.0, 3.0, 4.0, 5.0]
        got = [float(r[0]) for r in p.map(add2, (a for a, _ in slow_calls_with_arrays(5)), [1] * 5)]
        assert got == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_no_memory_for_a_result_is_a_memory_error(tmp_path):
    # With the address space nearly used up, copying a 4 MiB result out of its slot fails:
    # numpy's MemoryError, for `except MemoryError` to catch (pyo3's PanicException before,
    # a BaseException with a Rust panic's text on stderr), and the pool goes on.
    r = run_script(
        tmp_path,
        """
        import resource
        import numpy as np, mk1

        def double(x):
            return x * 2

        if __name__ == "__main__":
            size = next(int(l.split()[1]) for l in open("/proc/self/status")
                        if l.startswith("VmSize:")) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (size + (400 << 20),) * 2)
            with mk1.Pool(workers=2) as pool:
                hog = []
                try:
                    while True:
                        hog.append(np.ones(8 << 20, np.uint8))
                except MemoryError:
                    pass
                hog.pop(), hog.pop()
                for how in ("map", "imap_unordered"):
                    try:
                        list(getattr(pool, how)(double, [np.ones((1024, 1024), np.float32)] * 8))
                        print(how, "no error")
                    except MemoryError:
                        print(how, "MemoryError")
                del hog
                out = list(pool.map(double, [np.ones((1024, 1024), np.float32)] * 8))
                print("after", len(out), all((o == 2).all() for o in out))
        """,
    )
    assert r.returncode == 0, r.stderr
    assert "panicked" not in r.stderr, r.stderr
    assert "map MemoryError" in r.stdout, r.stdout + r.stderr
    assert "imap_unordered MemoryError" in r.stdout, r.stdout + r.stderr
    assert "after 8 True" in r.stdout, r.stdout + r.stderr


def test_ops_take_arrays_of_any_number_of_dimensions(pool):
    # A slot describes 1 to 4 dimensions: a 0-d array, or one of 5 or more, goes through as
    # one dimension (the ops are elementwise) and its result gets the input's shape back, in
    # every way a map or a submit can give it (refused with "reshape it first" before).
    op = mk1.ops.affine(2, 1)
    xs = [
        np.arange(64, dtype=np.float32).reshape(2, 2, 2, 2, 4),
        np.array(3.0),
        np.float64(2.5),
        np.arange(6).reshape(2, 3),
        np.zeros((0, 2, 1, 1, 1, 3)),
        np.arange(64, dtype=np.int16).reshape(2, 2, 2, 2, 2, 2)[..., ::2],
    ]
    want = [np.asarray(x) * np.asarray(2, np.asarray(x).dtype) + np.asarray(x).dtype.type(1)
            for x in xs]

    def same(got, w):
        return got.shape == w.shape and got.dtype == w.dtype and (got == w).all()

    assert all(same(g, w) for g, w in zip(pool.map(op, xs), want))
    assert all(same(g, w) for g, w in zip(pool.map(op, xs, zero_copy=True), want))
    assert all(same(f.result(), w) for f, w in zip([pool.submit(op, x) for x in xs], want))
    def key(a):
        return a.ndim, a.size, float(a.sum())

    got = sorted(pool.imap_unordered(op, xs), key=key)
    assert all(same(g, w) for g, w in zip(got, sorted(want, key=key)))
