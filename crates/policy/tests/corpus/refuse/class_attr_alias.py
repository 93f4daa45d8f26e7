# expect: python.process
import os
class A:
    go = os.system
A.go('id')
