// Script mode: greet the name in the task input.
//
// Reads the input JSON from the file named by $TASK_INPUT and writes
// {"greeting": "hello, <name>"} to the file named by $TASK_OUTPUT (stdout when
// either is not set). No libraries: a small scanner pulls out the "name" string.

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;

public class Main {
    public static void main(String[] args) throws IOException {
        String inputPath = System.getenv("TASK_INPUT");
        String input = inputPath != null
                ? Files.readString(Path.of(inputPath), StandardCharsets.UTF_8)
                : new String(System.in.readAllBytes(), StandardCharsets.UTF_8);

        String name = stringField(input, "name");
        if (name == null) {
            name = "world";
        }
        System.out.println("greeting " + name);

        String result = "{\"greeting\": \"" + escape("hello, " + name) + "\"}";
        String outputPath = System.getenv("TASK_OUTPUT");
        if (outputPath != null) {
            Files.writeString(Path.of(outputPath), result, StandardCharsets.UTF_8);
        } else {
            System.out.println(result);
        }
    }

    /** The value of the first string member called {@code key}, unescaped; null if absent. */
    static String stringField(String json, String key) {
        String quoted = "\"" + key + "\"";
        int at = json.indexOf(quoted);
        while (at >= 0) {
            int i = skipSpace(json, at + quoted.length());
            if (i < json.length() && json.charAt(i) == ':') {
                i = skipSpace(json, i + 1);
                if (i < json.length() && json.charAt(i) == '"') {
                    return readString(json, i + 1);
                }
                return null;
            }
            at = json.indexOf(quoted, at + 1);
        }
        return null;
    }

    static int skipSpace(String s, int i) {
        while (i < s.length() && Character.isWhitespace(s.charAt(i))) {
            i++;
        }
        return i;
    }

    static String readString(String s, int i) {
        StringBuilder out = new StringBuilder();
        while (i < s.length()) {
            char c = s.charAt(i++);
            if (c == '"') {
                return out.toString();
            }
            if (c != '\\') {
                out.append(c);
                continue;
            }
            char e = s.charAt(i++);
            switch (e) {
                case 'n' -> out.append('\n');
                case 't' -> out.append('\t');
                case 'r' -> out.append('\r');
                case 'b' -> out.append('\b');
                case 'f' -> out.append('\f');
                case 'u' -> {
                    out.append((char) Integer.parseInt(s.substring(i, i + 4), 16));
                    i += 4;
                }
                default -> out.append(e);
            }
        }
        return null;
    }

    static String escape(String s) {
        StringBuilder out = new StringBuilder();
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\n' -> out.append("\\n");
                case '\r' -> out.append("\\r");
                case '\t' -> out.append("\\t");
                default -> {
                    if (c < 0x20) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
                }
            }
        }
        return out.toString();
    }
}
