New options `--max-connections` (default 512) and `--max-connections-per-address` (default 64): a node refuses incoming connections over either cap at connect time, with a rate-limited log line.
