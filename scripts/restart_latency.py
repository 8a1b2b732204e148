#!/usr/bin/env python3
"""Kill -9 a worker of a running `mk1 run` eight times and time how long until a replacement
worker process is running (the coordinator noticed the death through its pidfd, reclaimed the
tokens, reset the rings and respawned). Usage: scripts/restart_latency.py [path/to/mk1]"""
import subprocess, time, os, json, signal
import sys
MK1 = sys.argv[1] if len(sys.argv) > 1 else 'target/release/mk1'
def workers_of(c):
    out=[]
    for pid in os.listdir('/proc'):
        if not pid.isdigit(): continue
        try: env=open(f'/proc/{pid}/environ','rb').read()
        except Exception: continue
        for v in env.split(b'\0'):
            if v.startswith(b'MK1_WORKER=') and v.split(b',')[2]==str(c).encode(): out.append(int(pid))
    return out
p=subprocess.Popen([MK1,'run','--json','--workers','2','--duration','6s','--max-dim','64'],stdout=subprocess.PIPE)
time.sleep(0.5)
res=[]
for i in range(8):
    before=set(workers_of(p.pid))
    victim=sorted(before)[i%2]
    t0=time.perf_counter(); os.kill(victim, signal.SIGKILL)
    while True:
        now=set(workers_of(p.pid))
        if len(now-before)>0 and len(now)==2: break
    res.append((time.perf_counter()-t0)*1e3)
    time.sleep(0.3)
out=p.communicate()[0]; j=json.loads(out)
print('kill -> replacement running (ms):', [round(x,2) for x in res])
print('verified',j['verified'],'lost',j['lost'],'restarts',j['worker_restarts'],'redone',j['redone'])
