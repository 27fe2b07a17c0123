"""`ambient bench`: the mesh measured against no mesh in one run (issue 8).

world.py    the bench lab's world and arms (pure)
loadgen.py  the request/response and connection-rate generator and servers, run inside pod netns
report.py   results, statistics and the Markdown table (pure)
run.py      the run: lab up, servers, scenarios alternating arms, enrolment, lab down (finally)
"""
