cd /work/wt/i14
for i in 1 2 3 4 5 6; do PYTHONPATH=. timeout 300 .venv/bin/python .scratch/repro.py 2>&1 | tail -2; cp /tmp/fca-probe.log /tmp/fca-probe.$i.log; cp /tmp/fca-dp.txt /tmp/fca-dp.$i.txt; done
