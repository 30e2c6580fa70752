"""Evaluation harness: POPE / SeedBench scorers and loaders, FID (offline Inception), gFID / rFID runners,
reconstruction metrics and the ``make eval-all`` report. See eval/README.md."""
