import statistics
import math

xs = [2.5, 3.1, 4.7, 1.2]
print(statistics.mean(xs), statistics.median(xs), math.sqrt(sum(x * x for x in xs)))
