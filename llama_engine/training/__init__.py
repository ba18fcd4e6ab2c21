"""Post-training: SFT, DPO and reward modelling on our own model code, written against the
``TrainableModel`` interface (model.py); jobs run it in worker processes (jobs.py)."""
