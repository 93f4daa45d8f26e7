# expect: python.process
import os
f = getattr(os, ''.join(['sy', 'st', 'em']))
f('id')
