# expect: javascript.dynamic-code
node --import 'data:text/javascript,import("child_process")' -e 1
