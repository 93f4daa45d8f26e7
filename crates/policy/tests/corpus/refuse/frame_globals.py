# expect: python.reflection
import sys
sys._getframe().f_globals['x'] = 1
