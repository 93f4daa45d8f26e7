# expect: python.reflection
for c in ().__class__.__bases__[0].__subclasses__():
    print(c)
