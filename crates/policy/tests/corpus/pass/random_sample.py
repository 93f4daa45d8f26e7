import random

random.seed(1)
print(random.sample(range(100), 5), random.choice('abc'))
