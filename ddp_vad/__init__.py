"""ddp_vad: distributed training toolkit for video anomaly detection.

Stages (one module each): ``ucsd``/``synth`` read or make clips, ``windows`` cuts and labels them,
``shards`` writes webdataset tars, ``data`` streams them, ``models`` holds the GAN and LRCN,
``pretrain`` trains the GAN, ``transfer`` fine-tunes fold-parallel, ``baselines`` runs classic ML,
``evaluate`` writes the report, ``pipeline`` chains everything.
"""

__version__ = "0.1.0"
