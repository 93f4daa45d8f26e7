# expect: python.process
import sys
sys.modules['os'].system('id')
