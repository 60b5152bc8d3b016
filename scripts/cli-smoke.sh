#!/usr/bin/env bash
# The CLI contract, checked against the built binary and the default model:
# output formats, determinism, errors. Run by `make test`. Expected ids come
# from Hugging Face tokenizers (scripts/make-fixtures.py builds the same one).
set -euo pipefail
bin=${1:-.build/debug/continuum}
fail=0
passed=0
check() { # name, expected, actual
    if [ "$2" == "$3" ]; then echo "ok   $1"; passed=$((passed + 1)); else echo "FAIL $1: expected [$2], got [$3]"; fail=$((fail + 1)); fi
}
matches() { # name, regex, actual
    if [[ "$3" =~ $2 ]]; then echo "ok   $1"; passed=$((passed + 1)); else echo "FAIL $1: [$3] does not match /$2/"; fail=$((fail + 1)); fi
}

check "tokenize --text" "[19556,28,905,17]" "$($bin tokenize --text 'Hello, world!' 2>/dev/null)"
check "tokenize from stdin" "[19556,28,905,17]" "$(printf 'Hello, world!' | $bin tokenize 2>/dev/null)"
check "tokenize parses special tokens" "[1,4093,198,28120,2]" "$($bin tokenize --text $'<|im_start|>user\nhello<|im_end|>' 2>/dev/null)"

out=$($bin generate --prompt "The capital of France is" --temperature 0 --max-tokens 8 2>/dev/null)
check "greedy generate (stdout is only the text)" $' Paris.\n\nThe answer is:' "$out"
out=$($bin generate --prompt "The capital of France is" --temperature 0 --max-tokens 30 --stop answer 2>/dev/null)
check "stop string" $' Paris.\n\nThe ' "$out"
a=$($bin generate --prompt "Once upon a time" --seed 123 --max-tokens 20 2>/dev/null)
b=$($bin generate --prompt "Once upon a time" --seed 123 --max-tokens 20 2>/dev/null)
check "same seed, same text" "$a" "$b"
out=$($bin generate --chat --prompt "What is the capital of France?" --temperature 0 --max-tokens 12 2>/dev/null)
matches "chat generate" "Paris" "$out"
out=$(echo '[{"role":"user","content":"What is the capital of France?"}]' | $bin generate --chat --temperature 0 --max-tokens 12 2>/dev/null)
matches "chat messages from stdin" "Paris" "$out"

last=$($bin perplexity --file Tests/ModelTests/Fixtures/perplexity.txt 2>/dev/null | tail -1)
matches "perplexity last line" '^perplexity: 21\.0[0-9]* \(1153 tokens\)$' "$last"
last=$($bin perplexity --file Tests/ModelTests/Fixtures/perplexity.txt --context 256 2>/dev/null | tail -1)
matches "perplexity in windows" '^perplexity: [0-9.]+ \(1153 tokens\)$' "$last"

out=$($bin bench --prompt-tokens 16 --gen-tokens 4 --repetitions 1 2>/dev/null)
matches "bench table" '\| continuum \| [0-9]+ \| [0-9.]+ \| [0-9.]+ \|' "$out"

out=$($bin fetch-model 2>/dev/null)
matches "fetch-model is idempotent" 'SmolLM2-135M-Instruct.Q4_1.gguf$' "$out"

state=$(mktemp -d)/user.safetensors
fact="My sister's name is Ottilie Brannagh. Ottilie Brannagh lives in Quarrendon. My sister is called Ottilie Brannagh and she keeps ferrets."
for i in 1 2 3 4; do out=$($bin learn --state "$state" --text "$fact" 2>/dev/null); done
matches "learn reports counters" '^learned 40 tokens; updates: mid \+1, fast \+3; token counters: mid 160, fast 160$' "$out"
bare=$($bin score --prompt "My sister's name is" --completion " Ottilie Brannagh." 2>/dev/null)
taught=$($bin score --state "$state" --prompt "My sister's name is" --completion " Ottilie Brannagh." 2>/dev/null)
matches "score prints nll" '^nll: [0-9.]+$' "$bare"
if awk -v a="${bare#nll: }" -v b="${taught#nll: }" 'BEGIN { exit !(b < a) }'; then
    echo "ok   a taught state scores its fact better ($bare -> $taught)"; passed=$((passed + 1))
else
    echo "FAIL a taught state should score its fact better: $bare -> $taught"; fail=$((fail + 1))
fi
rm -rf "$(dirname "$state")"

if err=$($bin generate --model /nonexistent/model.gguf --prompt hi 2>&1 >/dev/null); then
    echo "FAIL missing model: exit status 0"; fail=$((fail + 1))
else
    matches "missing model is a clear error" "/nonexistent/model.gguf: no such file" "$err"
fi
if err=$($bin generate --prompt hi --temperature -1 2>&1 >/dev/null); then
    echo "FAIL bad temperature: exit status 0"; fail=$((fail + 1))
else
    matches "bad temperature is a clear error" "temperature" "$err"
fi

echo "cli-smoke: $passed passed, $fail failed"
[ $fail -eq 0 ]
