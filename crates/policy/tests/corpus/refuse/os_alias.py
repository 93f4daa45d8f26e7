# expect: python.process
import os as o
o.system('id')
