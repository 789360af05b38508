New option `--part-max-age DAYS` (default 7): partial downloads left in a node's share longer than that are removed when the node starts and then daily.
