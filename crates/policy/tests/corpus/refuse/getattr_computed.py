# expect: python.process
import os
name = input()
getattr(os, name)('id')
