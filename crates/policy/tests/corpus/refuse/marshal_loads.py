# expect: python.dynamic-code
import marshal
c = marshal.loads(data)
