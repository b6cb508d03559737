"""``infermon demo``: a real small model in two versions, infermon in front of both, and traffic.

The command's flags live in :mod:`proxy.demo.cli`, which imports nothing heavy: numpy and the
model load only when the demo runs, so ``infermon --help`` and a proxy without sampling stay lean.
"""

#: the features the traffic shifts after a while, and by how many standard deviations
SHIFTED = ("sepal_length", "sepal_width")
SHIFT_SD = 2.0
