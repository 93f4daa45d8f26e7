# expect: python.dynamic-code
import code
code.interact()
