"""What the benchmark scripts share: the RESP parser and connection (`resp`), child processes and
/proc (`process`), the load generator's spec and how it is run (`load`), percentiles, tables, JSON
and verdict lines (`report`), the reference proxies (`proxies`) and profiling (`profiling`).
Nothing here imports `gateway/`: the benchmark never measures the gateway with its own code."""
