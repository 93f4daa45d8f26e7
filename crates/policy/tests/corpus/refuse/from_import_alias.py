# expect: python.process
from os import system as s
s('id')
