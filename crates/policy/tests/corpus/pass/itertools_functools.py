import itertools
import functools
import operator

print(functools.reduce(operator.mul, range(1, 10)))
print(list(itertools.combinations('abcd', 2)))
print(operator.attrgetter('real')(3))
