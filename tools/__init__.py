"""Real-scale tools: the real-format stand-ins (``standins``), ``make smoke-real`` (``smoke_real``) and
``make gpu-smoke`` (``gpu_smoke``)."""
