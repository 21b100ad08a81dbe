"""Evaluations of a run's weights: held-out perplexity, reasoning, passkey retrieval and loss by position.

`python -m train.eval {ppl,reasoning,passkey,position_loss,all} <run_dir | hf_dir | checkpoint>`; one module per
evaluation, `suite.py` runs them together (also at each stage end inside training), `curriculum.py` builds the
curriculum-effect table, `extend.py` sets up plain / YaRN / DCA inference beyond the trained length.
"""
