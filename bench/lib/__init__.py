"""What the benchmark scripts share: the RESP reader and connections (`resp`), child processes and
/proc (`process`), the load generator's spec and how it is run (`load`), the reference proxies
(`proxies`), and percentiles, tables, JSON and verdict lines (`report`). Nothing here imports
`gateway/`: the benchmark never measures the gateway with its own code."""
