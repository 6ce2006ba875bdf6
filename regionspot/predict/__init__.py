"""The predict stage: name the regions of your own images with the backbones online (no shards).

`predictor` (the `RegionPredictor` API), `config` (`PredictConfig`, the command's options), `inputs`
(image paths, output names, prompts and vocabularies, checked), `runner` (the batch loop), `draw`
(pictures).
"""
