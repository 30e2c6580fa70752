"""LLaVA-1.5 bridge: a frozen vision tower (OV3 export or HF CLIP/SigLIP) → projector → any HF causal LM.

Modules: ``conversation`` (templates, tokenization, label masking), ``vision`` (towers + image preprocessing),
``projector``, ``splice`` (−200 placeholders → ``inputs_embeds``), ``model`` (build / save / load),
``data`` (LLaVA JSON / shards, collator), ``sampler``, ``trainer`` (HF Trainer subclass), ``train`` (CLI),
``generate`` (inference; benchmark predictions: ``eval.adapters``), ``lmms_plugin`` (lmms-eval model), ``toy_llm`` (the toy language model).
"""

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200
IMAGE_PLACEHOLDER = "<image>"
