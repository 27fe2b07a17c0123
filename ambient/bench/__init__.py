"""`ambient bench`: the mesh measured against no mesh in one run (issue 8).

world.py    the bench lab's world and arms (pure)
loadgen.py  the request/response and connection-rate generator and the servers (rr, crr, echo, stream),
            run inside pod netns
connload.py the connection-count and fault clients (hold N idle connections, probe, marker download)
faults.py   the conns, churn and faults scenarios (kill -9, istiod down, node agent down, ztunnel restart)
report.py   results, statistics and the Markdown table (pure)
run.py      the run: lab up, servers, scenarios alternating arms, enrolment, lab down (finally)
"""
