# expect: python.process
import asyncio
async def main():
    p = await asyncio.create_subprocess_shell('id')
    await p.wait()
asyncio.run(main())
