"""The scene stage: nuScenes tables -> the 12 Hz timeline by trigger round, boxes at each exposure
time, BEV maps, per-scene zarr stores, stage configs and the clip index (mdv2-scenes).
Reads the contract; knows nothing of frames, the VAE or shards.
"""
