// expect: javascript.native
require('./build/Release/addon.node').run();
