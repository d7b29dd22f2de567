"""The soak's load process (`python bench/soak.py --load SPEC`), split by role.

- `spec`: what the orchestrator (bench/soak.py) asks of the load (`SoakSpec`);
- `tally`: what the load saw, by kind of command (latencies, refusals, errors, problems);
- `jobs`: every job it pushed, a byte of flags each, and their audit;
- `client`: one connection of a role (`Role`, `Client`);
- `context`: what the roles share (the spec, the random stream, the tally, the jobs, the pacing);
- the roles: `producer` (PUSH now and then), `batches` (batches, their members, deliberate
  violations, and the stand-in's audit of them), `worker` (FETCH, ACK or FAIL, BEAT);
- `load`: opening the connections, the watchdog, the periodic reports, the end, the audit.
"""
