"""The first hour's path: what `plan auto MODEL` and the app's Plan page do untold.

No imports: the CLI's parser reads these without loading torch.
"""

# Whitened low rank keeping 80% of the linear parameters,
# allocated on the calibration-weighted loss estimate of a small calibration.
# On the demo (benchmarks/results/bench_allocation.json, 16,384 eval tokens) that plan
# scores 16.56 against 12.95 dense (1.28x) after 35 s of allocation and 19 s of apply
# on 2 CPU cores; whitened low rank at 60% is 2.7x and any data-free low rank is
# >1000x. GPTQ's allocation at 3.3 bits is as good (16.62) but takes 285 s to score its
# bit widths, and whitened low rank is the method whose spectra the app shows.
DEFAULT_METHOD = "lowrank"
DEFAULT_TARGET_PARAMS = 0.8
# the `ppl` sensitivity's probe (a method's `probes`): the rank keeping half a module's
# parameters
DEFAULT_PROBE = "lowrank-half"
# calibration tokens computed when the model has none cached (the app's smallest size):
# the Grams of 4,096 tokens take about 45 s on the demo on 2 CPU cores
FIRST_CALIB_TOKENS = 4096
# the damages the app's Auto-allocate offers, the first its default (the `ppl` kind,
# one forward pass per module, is left to `plan auto --sensitivity ppl`)
APP_DAMAGES = ("calib", "none", "fisher")
