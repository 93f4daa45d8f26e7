# expect: python.process
import os
os.__dict__['system']('id')
