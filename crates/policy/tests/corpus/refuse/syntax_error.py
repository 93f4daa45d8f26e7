# expect: python.unparseable
import os
os.system('id'
