"""effarch: the library behind Module 2.4, Efficient Architectures.

Importing the package does no work: every module is imported on first use. Imports flow one way,
from the foundations at the top of this table to the labs' helpers at its bottom
(``tests/test_layout.py`` fails on a cycle).

| module | owns |
| --- | --- |
| ``paths`` | the repository's root, ``data/``, the zoo's and the measurements' folders |
| ``compat`` | every difference between transformers 5.17 and 5.24 (cache names and fields, mixer arguments, kernel binding) |
| ``registry`` | ``ModelSpec``: names, hub ids, published real-size configs, the zoo, hub and cache checks |
| ``profile`` | ``tiny`` / ``full`` / ``auto`` from ``EFFARCH_PROFILE``, the device, strict checks |
| ``data`` | loaders for what ``data/`` ships: the corpus by domain, the tokenizer, the long document |
| ``memory`` | memory available (unified-memory aware), parameter counts and weight bytes from a config, KV-cache and SSM-state bytes, ``require()`` |
| ``backends`` | which Mamba path runs (mamba-ssm kernels, mambapy, the sequential fallback) |
| ``ssm`` | the reference selective scan (mamba-ssm's signature), discretisation, sequential and parallel scans |
| ``mixer`` | a Mamba mixer's prefill, written once, with any scan |
| ``fast`` | the portable fast path: Triton scans (forward and backward) and the chunked scan, ``MambaFastGenerator``, ``use_fast_scan`` for training (kernels in ``_triton_scan``) |
| ``decoding`` | one ``Decoder`` interface for a transformers model and the fast generator; greedy decoding |
| ``bench`` | the measurement protocol: timing, device memory, prefill apart from decode, context sweeps |
| ``quality`` | the one sliding-window scorer, bits per byte |
| ``models`` | ``load_model`` (offline-first, memory-checked, random weights at real size, quantisation) |
| ``hooks`` | context managers that record SSM internals (Δ, states) and routing, always removed |
| ``moe`` | routing statistics, parameter counts of MoE models, the router's pieces |
| ``checks`` | the exercise checks: the student's answer when it passes, the reference when not |
| ``plots`` | the labs' shared plots and widgets |
| ``zoo``, ``training`` | the tiny zoo's settings, configs and evaluation; its training loop's pieces (``scripts/train_zoo.py``, ``scripts/eval_zoo.py``) |
| ``runs`` | kept records of whole-lab runs at full size, and the documents' tables made of them |
| ``compare`` | lab 2.4.5's harness: one table of every model under one protocol, its round trip, the crossover, the Pareto front and the decision guide |
| ``recall`` | multi-query associative recall (Zoology): the seeded generator, small attention/Mamba/hybrid models, their training and the shipped set |
| ``doctor`` | the environment report (``python -m effarch doctor``) |
| ``testing`` | the pytest plugin that runs labs unsolved and solutions strict |

| lab | modules it uses |
| --- | --- |
| 2.4.1 Mamba inference | doctor, models, memory, compat, bench, decoding, backends, fast, quality, data, plots, checks |
| 2.4.2 Mamba architecture | ssm, hooks, mixer, models, memory, compat, bench, data, plots, checks |
| 2.4.3 MoE exploration | models, moe, hooks, memory, data, plots, checks |
| 2.4.4 MoE router | moe, hooks, quality, models, memory, data, plots, checks |
| 2.4.5 Architecture comparison | compare, recall, bench, quality, memory, models, fast, decoding, plots, checks |
| 2.4.6 Mamba fine-tuning | models, backends, memory, data, plots, checks |
"""

__version__ = "0.1.0"
