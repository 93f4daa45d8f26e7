# expect: python.reflection
import operator
operator.attrgetter('__class__')(1)
