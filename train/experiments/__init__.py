"""One-command experiments: each trains with a conf/experiment/ preset and reports what it set out to measure."""
