// expect: javascript.unparseable
require('child_process').exec('id'
