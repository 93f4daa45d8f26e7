# expect: python.process
import os
os.system('id')
