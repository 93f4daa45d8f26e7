import numpy as np

rng = np.random.default_rng(42)
x = rng.normal(size=(1000, 3))
print(x.mean(axis=0), x.std(axis=0))
print(np.corrcoef(x.T))
