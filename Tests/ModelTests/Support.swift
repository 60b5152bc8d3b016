// ModelTests' own helper; models and fixture files come from TestSupport's
// `Fixtures` (one loader for every test target).
import Foundation

func maxAbsDiff(_ a: ArraySlice<Float>, _ b: ArraySlice<Float>) -> Float {
    zip(a, b).map { abs($0 - $1) }.max() ?? .infinity
}
