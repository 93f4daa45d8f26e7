# expect: python.unparseable
print 'hello'
