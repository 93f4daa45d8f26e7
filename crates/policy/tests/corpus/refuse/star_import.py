# expect: python.process
from os import *
system('id')
