"""Captions (paper Section 4.4): the middle frame of each clip, its V views, described by a
multimodal LLM behind any OpenAI-compatible endpoint; nuScenes' scene descriptions or
empty captions as the server-free modes. See docs/captions.md.

Entry points: captions.stage.caption_clips (pipeline), captions.regenerate.recaption_shards
(re-caption shards), captions.videos.caption_folder (new datasets), captions.cli (mdv2-caption).
"""
from captions.config import CaptionConfig, CaptionConfigError

__all__ = ["CaptionConfig", "CaptionConfigError"]
