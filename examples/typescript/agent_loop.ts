/**
 * A minimal code-interpreter agent in TypeScript: a model writes Python, moat runs it in a
 * sandbox, the output goes back to the model, until the model answers.
 *
 * The "model" is a scripted stand-in (no API key needed); replace `ScriptedModel.next` with a
 * call to a real model (see PLUG A REAL MODEL HERE). Run against a local daemon:
 *
 *     cd examples/typescript && npm install && MOAT_API_KEY=moat_… npm start
 *
 * (The SDK is linked from sdk/typescript: build it once with `npm ci && npm run build` there.)
 */

import { Client } from "moat-sdk";

const GROUP = process.env.MOAT_EXAMPLE_GROUP ?? "examples";
const TASK =
  "How many words of 'the quick brown fox jumps over the lazy dog' have more than three letters?";

interface Turn {
  role: "model" | "tool";
  content: string;
}

type Reply = { code: string } | { answer: string };

class ScriptedModel {
  next(task: string, history: Turn[]): Reply {
    // ---- PLUG A REAL MODEL HERE ----------------------------------------------------------
    // Send `task` and `history` to your model (with a tool that takes Python code) and turn
    // its answer into { code } or { answer }.
    // ----------------------------------------------------------------------------------------
    void task;
    const steps = history.filter((t) => t.role === "model").length;
    if (steps === 0) {
      return {
        code:
          "s = 'the quick brown fox jumps over the lazy dog'\n" +
          "long = [w for w in s.split() if len(w) > 3]\n" +
          "print(len(long), ' '.join(long))",
      };
    }
    const [count, ...words] = (history.at(-1)?.content ?? "").split(" ");
    return { answer: `${count} words have more than three letters: ${words.join(", ")}.` };
  }
}

async function main(): Promise<void> {
  const client = new Client();
  await client.groups.apply(GROUP, { tier: "s" });
  const model = new ScriptedModel();
  const history: Turn[] = [];
  // One sandbox for the whole conversation: files persist between steps.
  const sb = await client.sandboxes.create(GROUP, { labels: { example: "agent-loop-ts" } });
  try {
    for (let i = 0; i < 10; i++) {
      const reply = model.next(TASK, history);
      if ("answer" in reply) {
        console.log(`answer: ${reply.answer}`);
        return;
      }
      history.push({ role: "model", content: reply.code });
      console.log(`--- model runs:\n${reply.code}`);
      const r = await sb.exec(["python3", "-"], { stdin: reply.code, timeout: 60 });
      let output = r.stdout + r.stderr;
      if (r.exit_code !== 0) output += `\n(exit code ${r.exit_code})`;
      console.log(`--- sandbox says:\n${output.trimEnd()}`);
      history.push({ role: "tool", content: output.trim() });
    }
    throw new Error("the model did not answer within 10 steps");
  } finally {
    await sb.delete();
  }
}

await main();
