"""The learner: IPA and baseline losses, chunk returns, the staleness gate, the trainer, checkpoints.

Everything here is blocking torch code; the NATS worker calls it through ``anyio.to_thread``.
"""
