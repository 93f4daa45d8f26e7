name = 'x'
print('{} has {:.2f}'.format(name, 3.14159))
print('%s=%d' % ('a', 1))
