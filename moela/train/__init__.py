"""Training DeepSeek-architecture models with moela's own model code: `moela train` (see cli.py); the
multi-token-prediction module it trains is moela/models/mtp.py.

    data.py     source files -> held-out split by file -> byte-level BPE -> packed token windows
    loop.py     Trainer: AdamW/Muon, warmup + cosine, bf16 autocast, accumulation, DDP, checkpoints, resume
    balance.py  DeepSeek-V3 aux-loss-free bias update, sequence-wise balance loss, expert-load stats
    optim.py    Muon and the learning-rate schedule
    report.py   loss-curve PNG and model card
"""
