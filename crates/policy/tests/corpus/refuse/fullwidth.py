# expect: python.process
import os
os.ｓｙｓｔｅｍ('id')
